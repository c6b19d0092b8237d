"""A SuperNode: the one place that starts an institution's node processes and stops them.

The kit's node is two processes. Flower's SuperNode, started through
:mod:`fedaiot.launch.fast_supernode` (its fixed waits replaced, ``--isolation process``), and
the kit's ClientApp runner (:mod:`fedaiot.launch.clientapp_runner`), which it wakes through a
pipe when a message arrives and which forks a warm child per message. With stock polling, or a
Flower the fast paths were not verified against, it is Flower's ``flower-supernode`` alone (it
starts its own SuperExec, and a ClientApp process per message).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedaiot.config.polling import Polling
from fedaiot.launch import flower_patches
from fedaiot.launch.processes import spawn, stop_tree


@dataclass(frozen=True)
class SuperNode:
    """A SuperNode over TLS, authenticated by its key, its runtime API on ``port``."""

    superlink: str
    root_certificates: Path
    private_key: Path
    node_config: Path  # a TOML file: Flower reads it, so paths need no quoting
    port: int

    def flower_arguments(self) -> list[str]:
        return [
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

    def command(self) -> list[str]:
        """Flower's own SuperNode, with Flower's SuperExec (the stock node)."""
        return ["flower-supernode", *self.flower_arguments()]

    def fast_commands(self, wake_fd: int, read_fd: int) -> tuple[list[str], list[str]]:
        """The kit's SuperNode and its ClientApp runner, which share a pipe."""
        kit = str(os.getpid())
        supernode = [sys.executable, "-m", "fedaiot.launch.fast_supernode"]
        supernode += ["--wake-fd", str(wake_fd), "--parent-pid", kit, "--"]
        supernode += [*self.flower_arguments(), "--isolation", "process"]
        runner = [sys.executable, "-m", "fedaiot.launch.clientapp_runner"]
        runner += ["--runtime-api-address", f"127.0.0.1:{self.port}"]
        runner += ["--node-config", str(self.node_config), "--wake-fd", str(read_fd)]
        return supernode, [*runner, "--parent-pid", kit]


@dataclass
class NodeProcesses:
    """What a started node is: the SuperNode, and the kit's runner unless it runs stock."""

    supernode: subprocess.Popen[bytes]
    runner: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)  # what the kit chose, for its console

    def exited(self) -> tuple[str, int] | None:
        """Which process has stopped, and its code; None while both run."""
        if (code := self.supernode.poll()) is not None:
            return "flower-supernode", code
        if self.runner is not None and (code := self.runner.poll()) is not None:
            return "the ClientApp runner", code
        return None

    def stop(self) -> None:
        stop_tree(self.runner)
        stop_tree(self.supernode)


def start_supernode(
    node: SuperNode, env: dict[str, str], log: IO[bytes], polling: Polling
) -> NodeProcesses:
    """Start the node's processes; any failure on the way stops what was started."""
    notes = []
    if not polling.stock and (why := flower_patches.unverified()):
        notes.append(why)
        polling = Polling(mode="stock")
    env = {**env, **polling.to_env()}
    if polling.stock:
        return NodeProcesses(spawn(node.command(), env, log), notes=notes)
    read_fd, wake_fd = os.pipe()
    supernode = runner = None
    try:
        supernode_command, runner_command = node.fast_commands(wake_fd, read_fd)
        supernode = spawn(supernode_command, env, log, pass_fds=(wake_fd,))
        runner = spawn(runner_command, env, log, pass_fds=(read_fd,))
    except BaseException:
        stop_tree(runner)
        stop_tree(supernode)
        raise
    finally:
        os.close(read_fd)
        os.close(wake_fd)
    return NodeProcesses(supernode, runner, notes)


def wait_supernode(
    node: NodeProcesses, *, tick: float = 0.5, on_tick: Callable[[], None] | None = None
) -> int:
    """Wait until a node process stops, calling ``on_tick`` every ``tick`` s; on any way out
    (Ctrl-C, SIGTERM included) stop them all. The exit code is the SuperNode's, or 1 when the
    runner stopped first."""
    try:
        while (stopped := node.exited()) is None:
            if on_tick is not None:
                on_tick()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.supernode.wait(timeout=tick)
        if on_tick is not None:
            on_tick()
        name, code = stopped
        return code if name == "flower-supernode" else 1
    finally:
        node.stop()
