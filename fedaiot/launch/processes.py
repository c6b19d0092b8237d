"""Starting Flower's processes and stopping them with everything they started."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import psutil

from fedaiot.errors import FlowerRuntimeError


class LaunchError(FlowerRuntimeError):
    """A Flower process could not be started, did not come up, or stopped; the message says
    which and what to do."""


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment of Flower's processes: a private FLWR_HOME, no registry access."""
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        # Otherwise Flower runs `uv sync` against the registry for every run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # No usage reports to Flower's servers from an institution's or coordinator's machine.
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # Flower's processes start each other by name: find them next to this interpreter.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **extra,
    }


def spawn(
    command: list[str],
    env: dict[str, str],
    log: IO[bytes],
    *,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """A child in a session of its own, so that a terminal's Ctrl-C reaches us, not it;
    ``pass_fds`` stay open in it (a pipe between the node's two processes)."""
    try:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise LaunchError(f"{command[0]} not found: install fedaiot (it brings flwr)") from None


def free_port() -> int:
    """A port a server can listen on, below the range the system hands out to outgoing
    connections: a port from that range (``bind(0)``'s) can be taken by any process's next
    connection before the server binds it, which happened with ten nodes connecting at once."""
    low, high = 20000, _ephemeral_low()
    for _ in range(100):
        port = random.randrange(low, high) if high > low else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise LaunchError(f"no free port between {low} and {high} after 100 tries")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as uvicorn does, with SO_REUSEADDR:
    connections of a stopped server lingering in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def stop_tree(process: subprocess.Popen[bytes] | None) -> None:
    """Stop a child and every process below it (SIGTERM, then SIGKILL after 10 s).

    Flower's SuperLink and SuperNode start their app processes (ServerApp, ClientApps) as
    children of their own; the whole tree is collected before anything is signalled.
    """
    if process is None:
        return
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        process.poll()
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    process.poll()
