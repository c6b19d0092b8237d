"""Stopping a command that started processes: once, and through its ``finally`` clauses; and
stopping a process whose parent is gone."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType


def interrupt_once(exit_with: Callable[[int], BaseException]) -> None:
    """Make SIGTERM, and Ctrl-C unless this process was started with it ignored, raise
    ``exit_with(signum)`` the first time only: a second signal while the ``finally`` clauses
    stop the processes this one started must not cut that short and leave them running."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise exit_with(signum)

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, stop)


def follow_parent(parent: int) -> None:
    """Stop this process (Flower's own Ctrl-C path) once the process that started it is gone.
    Not Flower's monitor, which asks whether the parent's pid exists: a killed parent stays a
    zombie until its own parent reaps it, and this process would run on meanwhile; it is
    re-parented the moment its parent dies."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
