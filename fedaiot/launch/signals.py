"""Stopping a command that started processes: once, and through its ``finally`` clauses."""

from __future__ import annotations

import signal
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
