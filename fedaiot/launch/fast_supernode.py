"""``flower-supernode`` with the kit's waits: ``python -m fedaiot.launch.fast_supernode [--wake-fd
N] [--parent-pid P] -- <flower-supernode arguments>``.

Flower's SuperNode, in this process, after :mod:`fedaiot.launch.flower_patches` has replaced its
fixed waits (and its object pulls' first retry) with the ones in ``FEDAIOT_POLLING``. With
``--wake-fd`` it writes a byte to that pipe each time a message has been pulled and stored, which
wakes the kit's ClientApp runner at once. With ``--parent-pid`` it stops when that process is
gone (the kit was killed outright). An unverified Flower runs unpatched, with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

from fedaiot.config.polling import Polling
from fedaiot.launch import flower_patches
from fedaiot.launch.signals import follow_parent


def waker(fd: int) -> Callable[[], None]:
    """A non-blocking poke on the runner's pipe: a full pipe already says "look"."""
    os.set_blocking(fd, False)

    def wake() -> None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b"m")

    return wake


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--wake-fd", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("supernode", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    flower_patches.log_to_stderr()
    polling = Polling.from_env()
    if not polling.stock:
        wake = waker(args.wake_fd) if args.wake_fd is not None else None
        if flower_patches.patch_supernode(polling, wake):
            flower_patches.patch_object_pulls(polling)
    if args.parent_pid is not None:
        follow_parent(args.parent_pid)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    rest = [a for a in args.supernode if a != "--"]
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
