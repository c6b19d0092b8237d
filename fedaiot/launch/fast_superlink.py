"""``flower-superlink`` with the kit's housekeeping pace: ``python -m
fedaiot.launch.fast_superlink -- <flower-superlink arguments>``.

Flower's SuperLink, in this process, after :mod:`fedaiot.launch.flower_patches` has moved its
sweep of expired task tokens out of every request (``patch_token_sweep``) and sent each request
past the middlewares that would hand it through untouched (``patch_superlink_middleware``).
With stock polling
(``FEDAIOT_POLLING``), or a Flower the patch was not verified against (a warning says so), it is
Flower's SuperLink as shipped.
"""

from __future__ import annotations

import sys

from fedaiot.config.polling import Polling
from fedaiot.launch import flower_patches


def main(argv: list[str] | None = None) -> None:
    rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--"]
    flower_patches.log_to_stderr()
    if not Polling.from_env().stock:
        flower_patches.patch_token_sweep()
        flower_patches.patch_superlink_middleware()
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    flower_superlink()


if __name__ == "__main__":
    main()
