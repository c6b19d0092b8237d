"""A node process hands the heap it freed back to the system after every message.

Why: a simulated node runs in a Ray worker that lives for the whole run, and glibc keeps what
DP-SGD frees. Its 1-32 MB blocks (activations, per-sample gradients and their clipping, whose
sizes vary with each Poisson batch) come from the process heap once glibc's mmap threshold
has risen past them (it follows the largest mmapped block freed, up to 32 MB). Freed, they stay
in the heap as free chunks: glibc returns only a free top of the heap, and blocks still alive
sit above them. Each round's batches, of other sizes, leave more. Measured on Fashion-MNIST
(10 nodes, 2 workers): a worker's heap in use stayed at ~0.22 GB after every message while its
free chunks grew past 1.5 GB, and its private memory by hundreds of MB a round (7.7 GB at round
9, then Ray's out-of-memory guard). No Python object, tensor or ``Context.state`` entry
accumulated; the same growth shows in one process looping over the rounds.

``malloc_trim(0)`` gives back the free pages of every arena, holes included: the workers then
stay at ~0.76 GB between messages over 20 rounds (measured in the Ray workers while diagnosing;
``simulations/bench_worker_memory.py`` measures one process side by side, with and without).
Fixing the mmap threshold instead (``mallopt``) avoided the fragments too, but cost ~30 % more
training time (an mmap and fresh page faults for every large tensor).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# For simulations/bench_worker_memory.py only: set, a node keeps its freed heap as it used to,
# so that the benchmark can show the growth this module prevents.
KEEP_FREED_HEAP = "FEDAIOT_KEEP_FREED_HEAP"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator is not the one measured
        return None
    return trim


def return_freed_heap() -> bool:
    """Give every glibc arena's free pages back to the system; whether it was done."""
    trim = _malloc_trim()
    if trim is None or os.environ.get(KEEP_FREED_HEAP):
        return False
    trim(0)
    return True


def returns_freed_heap(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, followed by :func:`return_freed_heap` however it ends."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            return_freed_heap()

    return wrapper
