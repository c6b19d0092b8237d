"""The names of the tasks and partitioners, with no data set, model or torch behind them.

``fedaiot.config`` checks a run's task against these, so that reading a configuration (and
``fedaiot --help``) never loads a data set.
"""

from __future__ import annotations

from typing import Literal, get_args

from fedaiot.errors import BadInputError

TASK_NAMES: tuple[str, ...] = ("breast-cancer", "digits", "fashion-mnist", "basic-motions", "acsf1")
SYNTHETIC_PREFIX = "synthetic-"  # synthetic-<parameters>: a task of that many parameters

PartitionerName = Literal["iid", "dirichlet", "pathological"]
PARTITIONERS: tuple[str, ...] = get_args(PartitionerName)


class UnknownTaskError(BadInputError):
    """A task name that is not in the registry."""


def check_task_name(name: str) -> str:
    """``name`` if it names a task (a registered one, or ``synthetic-<digits>``)."""
    size = name.removeprefix(SYNTHETIC_PREFIX)
    if name in TASK_NAMES or (name.startswith(SYNTHETIC_PREFIX) and size.isdigit()):
        return name
    choices = ", ".join([*TASK_NAMES, f"{SYNTHETIC_PREFIX}<parameters>"])
    raise UnknownTaskError(f"unknown task {name!r}: choose one of {choices}")
