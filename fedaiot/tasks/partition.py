"""Split a task's data into a server test set and one partition per federated node."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner
from sklearn.model_selection import train_test_split

from fedaiot.errors import BadInputError
from fedaiot.tasks.base import ArrayData, FederatedData, Task
from fedaiot.tasks.names import PARTITIONERS, PartitionerName

# Dirichlet sampling may leave a node below its minimum size; flwr-datasets then resamples up
# to 10 times and gives up. We retry with a minimum of 1 and a few derived seeds before failing.
_DIRICHLET_EXTRA_TRIES = 3


@dataclass(frozen=True)
class SplitPlan:
    """Indices into the task's pool: the node partitions and (unless predefined) the test set."""

    test_index: np.ndarray | None
    partitions: list[np.ndarray]

    @property
    def train_index(self) -> np.ndarray:
        """Every pool index given to some node, sorted."""
        return np.sort(np.concatenate(self.partitions))


@lru_cache(maxsize=4)
def _load_raw(
    name: str, load: Callable[[], tuple[ArrayData, ArrayData | None]]
) -> tuple[ArrayData, ArrayData | None]:
    """Load a task's raw data once per process (Flower federates it every round)."""
    del name  # only part of the cache key, for readability of cache_info
    return load()


def load_raw(task: Task) -> tuple[ArrayData, ArrayData | None]:
    """The task's raw ``(pool, predefined test or None)``, cached in-process; do not modify."""
    return _load_raw(task.name, task.load)


def _validate(
    task: Task,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_node: int,
    test_fraction: float,
) -> None:
    if partitioner not in PARTITIONERS:
        raise BadInputError(
            f"unknown partitioner {partitioner!r}: choose one of {', '.join(PARTITIONERS)}"
        )
    if num_partitions < 1:
        raise BadInputError(f"num_partitions must be at least 1, got {num_partitions}")
    if partitioner == "dirichlet" and not alpha > 0:
        raise BadInputError(f"dirichlet alpha must be greater than 0, got {alpha}")
    if partitioner == "pathological" and not 1 <= classes_per_node <= task.num_classes:
        raise BadInputError(
            f"classes_per_node must be between 1 and {task.num_classes} "
            f"(the classes of task {task.name}), got {classes_per_node}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise BadInputError(
            f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}"
        )


def _derived_seed(seed: int, attempt: int) -> int:
    if attempt == 0:
        return seed
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])


def _run_partitioner(
    part: Partitioner, ds: datasets.Dataset, num_partitions: int
) -> list[np.ndarray]:
    part.dataset = ds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns on every Dirichlet resampling
        # Arrow keeps this fast: a plain column access builds a Python list of every index.
        return [
            part.load_partition(i).with_format("arrow")["idx"].to_numpy().astype(np.int64)
            for i in range(num_partitions)
        ]


def _dirichlet(
    task: Task, labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    ds = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    min_size = max(1, min(10, len(labels) // (2 * num_partitions)))
    tries = [(min_size, 0)] + [(1, attempt) for attempt in range(1, 1 + _DIRICHLET_EXTRA_TRIES)]
    for min_partition_size, attempt in tries:
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=_derived_seed(seed, attempt),
        )
        try:
            return _run_partitioner(part, ds, num_partitions)
        except ValueError:
            continue  # every sampling left some node under min_partition_size
    raise BadInputError(
        f"dirichlet split (alpha={alpha}) of {len(labels)} training samples of task {task.name} "
        f"left some of the {num_partitions} nodes empty in every try: "
        f"use a larger alpha or fewer nodes"
    )


def _partition_indices(
    task: Task,
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_node: int,
    seed: int,
) -> list[np.ndarray]:
    if partitioner == "dirichlet":
        return _dirichlet(task, labels, num_partitions, alpha, seed)
    part: Partitioner
    if partitioner == "iid":
        # IidPartitioner cuts contiguous shards, so shuffle first or nodes would get sorted runs.
        order = np.random.default_rng(seed).permutation(len(labels))
        ds = datasets.Dataset.from_dict({"idx": order, "label": labels[order]})
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        ds = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_node,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    try:
        return _run_partitioner(part, ds, num_partitions)
    except ValueError as err:
        message = " ".join(str(err).split())
        raise BadInputError(
            f"{partitioner} split of task {task.name} into {num_partitions} nodes failed: {message}"
        ) from err


def plan_partitions(
    task: Task,
    num_partitions: int,
    partitioner: PartitionerName = "dirichlet",
    alpha: float = 0.5,
    classes_per_node: int = 2,
    test_fraction: float = 0.2,
    seed: int = 42,
    validation: bool = False,
) -> SplitPlan:
    """Decide which pool samples form the test set and each node's partition (see federate).

    Plans are cached in-process; their index arrays are read-only.
    """
    _validate(task, num_partitions, partitioner, alpha, classes_per_node, test_fraction)
    key = _TaskKey(task)
    return _plan_lru(
        key, num_partitions, partitioner, alpha, classes_per_node, test_fraction, seed, validation
    )


class _TaskKey:
    """Hashable stand-in for a Task (whose list fields make it unhashable) in the plan cache."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.key = (task.name, task.load)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TaskKey) and self.key == other.key


@lru_cache(maxsize=16)
def _plan_lru(
    key: _TaskKey,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_node: int,
    test_fraction: float,
    seed: int,
    validation: bool,
) -> SplitPlan:
    task = key.task
    pool, predefined_test = load_raw(task)
    if predefined_test is None:
        train_index, test_index = train_test_split(
            np.arange(len(pool)), test_size=test_fraction, stratify=pool.y, random_state=seed
        )
        train_index = np.sort(train_index)
        test_index = np.sort(test_index)
    else:
        train_index, test_index = np.arange(len(pool)), None
    if validation:  # tuning: the test set is never touched; a slice of training stands in
        train_index, test_index = train_test_split(
            train_index, test_size=test_fraction, stratify=pool.y[train_index], random_state=seed
        )
        train_index, test_index = np.sort(train_index), np.sort(test_index)
    if num_partitions > len(train_index):
        raise BadInputError(
            f"cannot split {len(train_index)} training samples of task {task.name} "
            f"into {num_partitions} nodes"
        )
    local = _partition_indices(
        task, pool.y[train_index], num_partitions, partitioner, alpha, classes_per_node, seed
    )
    partitions = [train_index[idx] for idx in local]
    for node, idx in enumerate(partitions):
        if len(idx) == 0:
            raise BadInputError(
                f"{partitioner} split of task {task.name} left node {node} of {num_partitions} "
                f"empty: use fewer nodes or another partitioner"
            )
    for index in [*partitions, test_index]:
        if index is not None:
            index.setflags(write=False)
    return SplitPlan(test_index=test_index, partitions=partitions)


def _feature_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but 1 (the feature / channel axis): statistics are per feature or channel."""
    return tuple(axis for axis in range(x.ndim) if axis != 1)


def _standardizer(test_x: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    axes = _feature_axes(test_x)
    mean = test_x.mean(axis=axes, dtype=np.float64)
    std = test_x.std(axis=axes, dtype=np.float64)
    std = np.where(std < 1e-8, 1.0, np.maximum(std, floor))
    return mean, std


def _apply(data: ArrayData, mean: np.ndarray, std: np.ndarray) -> ArrayData:
    shape = [1] * data.x.ndim
    shape[1] = -1
    x = (data.x - mean.reshape(shape)) / std.reshape(shape)
    return ArrayData(x=x.astype(np.float32), y=data.y)


def standardize(data: ArrayData, normalization: dict[str, list[float]]) -> ArrayData:
    """Apply ``federate``'s standardization (its ``normalization`` stats) to other data.

    A deployed node holds its own files: it standardizes them with the statistics of the
    coordinator's held-out set, exactly as a simulated node's partition is standardized.
    """
    mean = np.asarray(normalization["mean"], dtype=np.float64)
    std = np.asarray(normalization["std"], dtype=np.float64)
    return _apply(data, mean, std)


def federate(
    task: Task,
    num_partitions: int,
    partitioner: PartitionerName = "dirichlet",
    alpha: float = 0.5,
    classes_per_node: int = 2,
    test_fraction: float = 0.2,
    seed: int = 42,
    validation: bool = False,
) -> FederatedData:
    """Split ``task`` into a server test set and ``num_partitions`` node partitions.

    With ``validation`` the test set is set aside unused, and a stratified ``test_fraction``
    of the training pool takes its place: hyperparameters are tuned on that, never on the test
    set.

    The task's predefined test set is the server's test set; otherwise a stratified
    ``test_fraction`` of the pool is held out. The rest is split among nodes with a
    flwr-datasets partitioner: ``iid``, ``dirichlet`` (by label, concentration ``alpha``) or
    ``pathological`` (``classes_per_node`` labels per node; classes no node draws are left out).
    Tasks with ``normalize`` are standardized per feature / channel with statistics of the
    server's test set only. The same arguments always give the same arrays.
    """
    plan = plan_partitions(
        task, num_partitions, partitioner, alpha, classes_per_node, test_fraction, seed, validation
    )
    pool, predefined_test = load_raw(task)

    def take(index: np.ndarray) -> ArrayData:
        return ArrayData(x=pool.x[index], y=pool.y[index])

    if plan.test_index is not None:
        test = take(plan.test_index)  # the held-out test set, or the validation slice
    else:
        assert predefined_test is not None
        test = ArrayData(x=predefined_test.x.copy(), y=predefined_test.y.copy())
    partitions = [take(index) for index in plan.partitions]
    normalization: dict[str, list[float]] = {}
    if task.normalize:
        mean, std = _standardizer(test.x, task.std_floor)
        test = _apply(test, mean, std)
        partitions = [_apply(part, mean, std) for part in partitions]
        normalization = {"mean": mean.tolist(), "std": std.tolist()}
    return FederatedData(test=test, partitions=partitions, normalization=normalization)
