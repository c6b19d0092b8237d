"""Learning tasks (data + model) and their split into federated node partitions."""

from __future__ import annotations

from fedaiot.tasks.base import ArrayData, DataUnavailableError, FederatedData, Task
from fedaiot.tasks.images import DIGITS, FASHION_MNIST
from fedaiot.tasks.partition import PARTITIONERS, PartitionerName, federate
from fedaiot.tasks.sensors import ACSF1, BASIC_MOTIONS
from fedaiot.tasks.synthetic import PREFIX as SYNTHETIC_PREFIX
from fedaiot.tasks.synthetic import synthetic_task
from fedaiot.tasks.tabular import BREAST_CANCER


class UnknownTaskError(ValueError):
    """A task name that is not in the registry."""


TASKS: dict[str, Task] = {
    task.name: task for task in (BREAST_CANCER, DIGITS, FASHION_MNIST, BASIC_MOTIONS, ACSF1)
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; raises UnknownTaskError listing the choices."""
    if name in TASKS:
        return TASKS[name]
    size = name.removeprefix(SYNTHETIC_PREFIX)
    if name.startswith(SYNTHETIC_PREFIX) and size.isdigit():
        try:
            return synthetic_task(int(size))
        except ValueError as exc:
            raise UnknownTaskError(f"task {name!r}: {exc}") from None
    choices = ", ".join([*TASKS, f"{SYNTHETIC_PREFIX}<parameters>"])
    raise UnknownTaskError(f"unknown task {name!r}: choose one of {choices}")


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
