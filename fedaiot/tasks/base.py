"""Core types of a learning task: its data containers and its description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedaiot.errors import BadInputError

if TYPE_CHECKING:
    import torch


class DataUnavailableError(BadInputError):
    """A task's data is not on this machine; the message says how to get it."""

    reason = "data-error"  # the code a node sends on the wire instead of the text


@dataclass(frozen=True)
class ArrayData:
    """Samples ``x`` (float32, shape ``(n, *input_shape)``) and labels ``y`` (int64, ``(n,)``)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32:
            raise ValueError(f"ArrayData.x must be float32, got {self.x.dtype}")
        if self.y.dtype != np.int64:
            raise ValueError(f"ArrayData.y must be int64, got {self.y.dtype}")
        if self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayData needs x of shape (n, ...) and y of shape (n,), "
                f"got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, rows: np.ndarray) -> ArrayData:
        return ArrayData(self.x[rows], self.y[rows])


@dataclass(frozen=True)
class FederatedData:
    """The server's held-out test set, one partition per node, and the normalization used."""

    test: ArrayData
    partitions: list[ArrayData]
    normalization: dict[str, list[float]]

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)


@dataclass(frozen=True)
class Task:
    """A classification task: where its data comes from and which model learns it.

    ``load`` returns ``(pool, test)``: the raw (un-normalized) float32 training pool and the
    predefined test set, or ``None`` when the task has none and one is split off the pool.
    ``build_model`` gives a fresh Opacus-compatible model (no BatchNorm).
    ``normalize`` asks ``federate`` to standardize every feature / channel (axis 1).
    """

    name: str
    description: str
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]
    feature_names: list[str] | None
    architecture: str
    load: Callable[[], tuple[ArrayData, ArrayData | None]] = field(repr=False)
    build_model: Callable[[], torch.nn.Module] = field(repr=False)
    normalize: bool = False
    std_floor: float = 1e-8  # smallest standard deviation used when standardizing
    positive_class: int = 1  # for binary tasks: the class that sensitivity and AUC are about

    def input_schema(self, normalization: dict[str, list[float]]) -> dict[str, Any]:
        """Describe what the model takes as input, as a JSON-able dict."""
        return {
            "shape": list(self.input_shape),
            "dtype": "float32",
            "feature_names": list(self.feature_names) if self.feature_names is not None else None,
            "class_names": list(self.class_names),
            "positive_class": self.positive_class if self.num_classes == 2 else None,
            "normalization": {key: list(values) for key, values in normalization.items()},
        }
