"""``flower-superlink`` with the kit's housekeeping pace: ``python -m
fedaiot.launch.fast_superlink [--parent-pid P] -- <flower-superlink arguments>``.

Flower's SuperLink, in this process, after :mod:`fedaiot.launch.flower_patches` has moved its
sweep of expired task tokens out of every request (``patch_token_sweep``) and sent each request
past the middlewares that would hand it through untouched (``patch_superlink_middleware``).
With stock polling
(``FEDAIOT_POLLING``), or a Flower the patch was not verified against (a warning says so), it is
Flower's SuperLink as shipped.

With ``--parent-pid`` it stops when that process is gone (the coordinator's kit, or the
simulation, was killed outright); its SuperExec and ServerApp follow it, through Flower's own
parent monitors.
"""

from __future__ import annotations

import argparse
import sys

from fedaiot.config.polling import Polling
from fedaiot.launch import flower_patches
from fedaiot.launch.signals import follow_parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("superlink", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    flower_patches.log_to_stderr()
    if not Polling.from_env().stock:
        flower_patches.patch_token_sweep()
        flower_patches.patch_superlink_middleware()
    if args.parent_pid is not None:
        follow_parent(args.parent_pid)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *[a for a in args.superlink if a != "--"]]
    flower_superlink()


if __name__ == "__main__":
    main()
