"""Waiting in tests on an event, never on a clock: poll a check until it holds, with a ceiling
generous enough for a loaded 2-core machine, and fail at once if the process we wait on died."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
CEILING = 300.0  # a ceiling, not an expectation: the check usually holds in seconds


def wait_until(
    check: Callable[[], T | None],
    what: str,
    *,
    timeout: float = CEILING,
    process: subprocess.Popen[str] | subprocess.Popen[bytes] | None = None,
    poll: float = 0.1,
) -> T:
    """``check()``'s first truthy value; AssertionError naming ``what`` past ``timeout`` or
    as soon as ``process`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def answers(url: str) -> bool:
    """Whether an HTTP server answers ``url`` (with any status)."""
    import httpx

    try:
        httpx.get(url, timeout=2)
    except httpx.TransportError:
        return False
    return True
