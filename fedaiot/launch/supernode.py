"""A SuperNode: the one place that starts ``flower-supernode`` and waits for it to stop."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedaiot.launch.processes import spawn, stop_tree


@dataclass(frozen=True)
class SuperNode:
    """A SuperNode over TLS, authenticated by its key, its ClientApp API on ``port``."""

    superlink: str
    root_certificates: Path
    private_key: Path
    node_config: Path  # a TOML file: Flower reads it, so paths need no quoting
    port: int

    def command(self) -> list[str]:
        return [
            "flower-supernode",
            "--superlink",
            self.superlink,
            "--root-certificates",
            str(self.root_certificates.resolve()),
            "--auth-supernode-private-key",
            str(self.private_key.resolve()),
            "--node-config",
            str(self.node_config),
            "--port",
            str(self.port),
        ]


def start_supernode(
    node: SuperNode, env: dict[str, str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    return spawn(node.command(), env, log)


def wait_supernode(process: subprocess.Popen[bytes]) -> int:
    """Wait for the SuperNode; on Ctrl-C or SIGTERM stop it with its ClientApps."""
    try:
        return process.wait()
    finally:
        stop_tree(process)
