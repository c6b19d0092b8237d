"""Waiting in tests on an event, never on a clock: poll a check until it holds, with a ceiling
generous enough for a loaded 2-core machine, and fail at once if the process we wait on died."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
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


# Put before a script run by ``run_together``: it says it is ready, then waits for the others.
# The script then finds the shared folder in ``folder``, its own name in ``me`` (w0, w1, ...)
# and ``run_together``'s extra arguments in ``sys.argv[3:]``.
TOGETHER = """
import sys, time
from pathlib import Path
folder, me = Path(sys.argv[1]), sys.argv[2]
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
"""


def run_together(script: str, folder: Path, writers: int, *args: str) -> None:
    """Run ``writers`` copies of ``script`` (a Python program) released at the same moment,
    once every one of them has started, and assert that each exits 0: a race, made likely."""
    import sys

    command = [sys.executable, "-c", TOGETHER + script, str(folder)]
    processes = [subprocess.Popen([*command, f"w{n}", *args]) for n in range(writers)]
    try:
        for n, process in enumerate(processes):
            ready = folder / f"ready-w{n}"
            wait_until(ready.exists, f"writer {n} to start", process=process)
        (folder / "go").touch()
        assert [p.wait(timeout=CEILING) for p in processes] == [0] * writers
    finally:
        for process in processes:
            process.kill()
