"""A SuperLink: the one place that starts ``flower-superlink`` and waits until it answers.

Used by the simulation (``--simulation``, plain HTTP on loopback) and by the coordinator's kit
(TLS, node authentication, a state database). The process is stopped on any way out of the
start, an interrupt while it starts included.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from fedaiot.config.polling import Polling
from fedaiot.launch.processes import LaunchError, spawn, stop_tree


@dataclass(frozen=True)
class Tls:
    ca: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class SuperLink:
    """What a SuperLink is started with. ``tls`` None means ``--insecure`` (loopback only)."""

    port: int
    database: Path
    host: str = "127.0.0.1"
    tls: Tls | None = None
    node_auth: bool = False
    simulation: bool = False

    def command(self, *, fast: bool = True, parent: int | None = None) -> list[str]:
        """``fast``: through :mod:`fedaiot.launch.fast_superlink` (Flower's SuperLink, its token
        sweep and pass-through middlewares out of each request's way), which stops when the
        process ``parent`` is gone; else Flower's ``flower-superlink``."""
        command = ["flower-superlink"]
        if fast:
            command = [sys.executable, "-m", "fedaiot.launch.fast_superlink"]
            if parent is not None:
                command += ["--parent-pid", str(parent)]
            command.append("--")
        if self.tls is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(self.tls.ca),
                "--ssl-certfile",
                str(self.tls.certificate),
                "--ssl-keyfile",
                str(self.tls.key),
            ]
        if self.node_auth:
            command.append("--enable-supernode-auth")
        if self.simulation:
            command += ["--simulation", "--isolation", "subprocess"]
        command += ["--database", str(self.database)]
        command += ["--disable-runtime-dependency-installation"]
        return [*command, "--host", self.host, "--port", str(self.port)]

    @property
    def local_address(self) -> str:
        """Where this machine's own clients reach it (all interfaces: through loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def health(self) -> tuple[str, ssl.SSLContext | bool]:
        if self.tls is None:
            return f"http://{self.local_address}/health", False
        return f"https://{self.local_address}/health", ssl.create_default_context(
            cafile=str(self.tls.ca)
        )


def start_superlink(
    link: SuperLink, env: dict[str, str], log: IO[bytes], *, timeout: float = 90.0
) -> subprocess.Popen[bytes]:
    """Start the SuperLink and return once ``/health`` answers; LaunchError if it does not.
    Stock polling in ``env`` (``FEDAIOT_POLLING``) starts Flower's SuperLink as shipped."""
    fast = not Polling.from_env(env).stock
    process = spawn(link.command(fast=fast, parent=os.getpid()), env, log)
    url, verify = link.health()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LaunchError(
                    f"flower-superlink exited with code {process.returncode}: see {log.name}"
                )
            try:
                if httpx.get(url, verify=verify, timeout=1.0).is_success:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise LaunchError(f"flower-superlink did not answer on {url} within {timeout:.0f} s")
    except BaseException:
        stop_tree(process)
        raise
