"""Learning tasks (data + model) and their split into federated node partitions."""

from __future__ import annotations

from fedaiot.tasks.base import ArrayData, DataUnavailableError, FederatedData, Task
from fedaiot.tasks.images import DIGITS, FASHION_MNIST
from fedaiot.tasks.partition import PARTITIONERS, PartitionerName, federate
from fedaiot.tasks.sensors import ACSF1, BASIC_MOTIONS
from fedaiot.tasks.tabular import BREAST_CANCER


class UnknownTaskError(ValueError):
    """A task name that is not in the registry."""


TASKS: dict[str, Task] = {
    task.name: task for task in (BREAST_CANCER, DIGITS, FASHION_MNIST, BASIC_MOTIONS, ACSF1)
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; raises UnknownTaskError listing the choices."""
    try:
        return TASKS[name]
    except KeyError:
        choices = ", ".join(TASKS)
        raise UnknownTaskError(f"unknown task {name!r}: choose one of {choices}") from None


__all__ = [
    "PARTITIONERS",
    "TASKS",
    "ArrayData",
    "DataUnavailableError",
    "FederatedData",
    "PartitionerName",
    "Task",
    "UnknownTaskError",
    "federate",
    "get_task",
]
