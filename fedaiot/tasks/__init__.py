"""Learning tasks (data + model), their evaluation, and their split into federated node partitions.

Importing this package is light (the names in ``names``); the data, models and partitioners,
which need torch, scikit-learn and flwr-datasets, load on first use of ``get_task``,
``federate``, ``ArrayData`` and the rest. May import ``fedaiot.errors`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedaiot.tasks.names import (
    PARTITIONERS,
    SYNTHETIC_PREFIX,
    TASK_NAMES,
    PartitionerName,
    UnknownTaskError,
    check_task_name,
)

if TYPE_CHECKING:
    from fedaiot.tasks.base import ArrayData, DataUnavailableError, FederatedData, Task
    from fedaiot.tasks.partition import federate

_LAZY = {
    "ArrayData": "fedaiot.tasks.base",
    "DataUnavailableError": "fedaiot.tasks.base",
    "FederatedData": "fedaiot.tasks.base",
    "Task": "fedaiot.tasks.base",
    "federate": "fedaiot.tasks.partition",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tasks() -> dict[str, Task]:
    """Every registered task, by name (loads their modules, not their data)."""
    from fedaiot.tasks.images import DIGITS, FASHION_MNIST
    from fedaiot.tasks.sensors import ACSF1, BASIC_MOTIONS
    from fedaiot.tasks.tabular import BREAST_CANCER

    found = (BREAST_CANCER, DIGITS, FASHION_MNIST, BASIC_MOTIONS, ACSF1)
    return {task.name: task for task in found}


def get_task(name: str) -> Task:
    """The registered task called ``name``; raises UnknownTaskError listing the choices."""
    check_task_name(name)
    if name in TASK_NAMES:
        return tasks()[name]
    from fedaiot.tasks.synthetic import synthetic_task

    try:
        return synthetic_task(int(name.removeprefix(SYNTHETIC_PREFIX)))
    except ValueError as exc:
        raise UnknownTaskError(f"task {name!r}: {exc}") from None


__all__ = [
    "PARTITIONERS",
    "TASK_NAMES",
    "ArrayData",
    "DataUnavailableError",
    "FederatedData",
    "PartitionerName",
    "Task",
    "UnknownTaskError",
    "check_task_name",
    "federate",
    "get_task",
    "tasks",
]
