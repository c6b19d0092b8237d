"""What a deployed node loads once instead of for every message: its records (and their
fingerprint, which names its ledger), its study table, and the training stack's imports.

The kit's ClientApp runner (``fedaiot.launch.clientapp_runner``) calls :func:`warm_up` before it
forks a child per message, so each child finds all of it in memory. A file is read again when
it changes (its size or modification time), so a node never trains on a stale copy. Only
imports and file reads happen here, no torch computation: the runner forks after it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_CACHE: dict[tuple[Any, ...], Any] = {}

# What a training or release message imports lazily: imported here, paid once per node.
STACK = (
    "torch",
    "torch._dynamo",  # torch.optim imports it at the first optimizer: 2 to 3 s
    "opacus",
    "fedaiot.node.requests",
    "fedaiot.node.training",
    "fedaiot.node.gradient_share",
    "fedaiot.privacy.accounting",
    "dp_accounting",  # the PLD accountant, imported at the first epsilon: 30 ms a message
    "dp_accounting.pld.pld_privacy_accountant",
    "cryptography.hazmat.backends.openssl",  # at the first X25519 key of a secure round
    "fedaiot.privacy.budget",
    "fedaiot.secure_rounds.handlers",
    "fedaiot.wire.records",
)


def _stamp(path: Path) -> tuple[Any, ...]:
    """What changes when the data changes: each file's size and modification time."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        stat = path.stat()
        return (str(path), stat.st_size, stat.st_mtime_ns)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return (str(path), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def once(kind: str, path: Path, load: Callable[[], T]) -> T:
    """``load()``'s value for this version of ``path``, computed at most once per process."""
    try:
        key = (kind, *_stamp(path))
    except OSError:
        return load()  # a missing file: let the loader name the fault
    if key not in _CACHE:
        for stale in [k for k in _CACHE if k[0] == kind]:
            del _CACHE[stale]
        _CACHE[key] = load()
    value: T = _CACHE[key]
    return value


def warm_up(node_config: Mapping[str, Any]) -> None:
    """Import the training stack and read the institution's data, as a message would."""
    from fedaiot.node.deployed import DATA_PATH, NodeSettings, local_records

    for module in STACK:
        importlib.import_module(module)
    if DATA_PATH not in node_config:
        return
    settings = NodeSettings.from_node_config(node_config)
    if settings.study is not None:
        from fedaiot.node.requests import study_records
        from fedaiot.studies.spec import load_study

        study_records(load_study(settings.study), settings.data_path)
        return
    from fedaiot.tasks import get_task

    local_records(get_task(settings.task), settings.data_path)
