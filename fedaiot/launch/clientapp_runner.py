"""The institution's SuperExec: one warm process that forks a ClientApp runner per task.

Flower's SuperExec starts ``flwr-clientapp`` afresh for every message (1.2 to 1.5 CPU-s of
imports before the handler runs), and torch, the task and the data load again each time. This
one imports all of it once, reads the institution's data once, and for each task forks a child
that runs Flower's own ``run_clientapp`` on the task's token: the child pays milliseconds.

It runs with the SuperNode's ``--isolation process`` (the SuperNode then starts no SuperExec of
its own), asks the SuperNode's runtime API for tasks as Flower's SuperExec does
(``AcquireTask``), and waits for them on a pipe the SuperNode writes to when a message has
arrived (``fedaiot.launch.fast_supernode``), falling back to a timed poll. Internal Flower APIs:
pinned to Flower 1.41.0 and run against it in the tests.

The parent never runs torch code: forking a process whose OpenMP pool was started is not safe.
It stays single-threaded, and stops its children when it is stopped or its parent dies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import signal
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

from fedaiot.config.polling import Polling
from fedaiot.launch import flower_patches

LOG = logging.getLogger("fedaiot.launch")
STOP_GRACE = 10.0  # seconds a child gets to end its task after SIGTERM


class Stopped(BaseException):
    """SIGTERM or SIGINT reached the runner."""


def preload(app_module: str, node_config: Path | None) -> None:
    """Everything a task needs, imported and read once, before any fork."""
    importlib.import_module("flwr.supernode.runtime.run_clientapp")
    importlib.import_module(app_module)
    if node_config is not None:
        from fedaiot.node.warm import warm_up

        warm_up(tomllib.loads(node_config.read_text()))


class Runner:
    """Acquire tasks and fork one child per task; reap them; stop them all on the way out."""

    def __init__(
        self, address: str, polling: Polling, wake_fd: int | None, parent: int | None
    ) -> None:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        self.address, self.polling, self.wake_fd, self.parent = address, polling, wake_fd, parent
        self.children: set[int] = set()
        self.stopping = False
        self.forking = False  # a signal then only sets ``stopping``: the child is recorded
        self.client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,  # the SuperNode's runtime API listens on 127.0.0.1 only
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self) -> str | None:
        """A task's token, or None when the SuperNode has none waiting."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        answer = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        return str(answer.token) if answer.HasField("task") and answer.token else None

    def fork(self, token: str) -> None:
        runner = os.getpid()
        self.forking = True
        pid = os.fork()
        if pid:
            self.children.add(pid)
            self.forking = False
            return
        code = 1
        try:  # the child: Flower's own ClientApp process body, on already imported modules
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self.wake_fd is not None:
                os.close(self.wake_fd)
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            run_clientapp(
                runtime_api_address=self.address,
                token=token,
                insecure=True,
                certificates=None,
                parent_pid=runner,  # a runner killed outright takes its children with it
                runtime_dependency_install=False,
            )
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            LOG.exception("fedaiot: the ClientApp runner failed")
        finally:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def reap(self) -> None:
        while self.children:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)

    def wait_for_work(self) -> None:
        """Until the SuperNode says a message arrived, or the fallback interval passed."""
        timeout = self.polling.task
        if self.wake_fd is None:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select([self.wake_fd], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                if not os.read(self.wake_fd, 4096):  # the SuperNode closed its end
                    os.close(self.wake_fd)
                    self.wake_fd = None
            except BlockingIOError:
                pass

    def run(self) -> None:
        while not self.stopping:
            if self.parent is not None and os.getppid() != self.parent:
                LOG.warning("fedaiot: the kit that started this runner is gone: stopping")
                return
            self.reap()
            token = self.acquire()
            if token is not None:
                self.fork(token)
                continue  # another task may be waiting: ask again before sleeping
            self.wait_for_work()

    def stop_children(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while self.children:
                pid, _ = os.waitpid(-1, 0)
                self.children.discard(pid)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--app", default="clients.client_app", help="the ClientApp's module")
    parser.add_argument("--node-config", type=Path, default=None)
    parser.add_argument("--wake-fd", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser.parse_args(argv)


def serve(runner: Runner) -> None:
    """Run until SIGTERM or SIGINT (or the kit is gone); every child is stopped on the way out,
    whatever it was doing."""

    def stop(signum: int, frame: FrameType | None) -> None:
        if runner.stopping:  # a second Ctrl-C must not cut the children's stop short
            return
        runner.stopping = True
        if not runner.forking:  # out of a blocking request or wait at once
            raise Stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("fedaiot: ClientApp runner ready (pid %d)", os.getpid())
    try:
        runner.run()
    except Stopped:
        pass
    finally:
        runner.stop_children()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    flower_patches.log_to_stderr()
    polling = Polling.from_env()
    if why := flower_patches.unverified():
        LOG.error("fedaiot: %s; start the node with Flower's own SuperExec", why)
        return 2
    preload(args.app, args.node_config)
    flower_patches.patch_object_pulls(polling)
    flower_patches.patch_clientapp_loading(args.app)
    flower_patches.patch_fab_install()
    serve(Runner(args.runtime_api_address, polling, args.wake_fd, args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
