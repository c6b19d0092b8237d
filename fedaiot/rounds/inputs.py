"""Where the coordinator's input statistics and evaluation come from.

A built-in task's coordinator holds public reference data: it standardizes with the statistics
of its held-out set and evaluates every round on it (:class:`CentralInputs`). A study's
coordinator holds no data: the nodes compute both, together and with DP noise
(:class:`fedaiot.rounds.study_phases.FederatedInputs`). The round loop asks either the same
four things.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedaiot.config.run import RunConfig
from fedaiot.tasks import Task, federate, histogram
from fedaiot.tasks.evaluation import evaluate


class Inputs(Protocol):
    max_weight: float  # the most weight one node may carry in the average

    def prepare(self, grid: Grid) -> dict[str, Any]:
        """Anything to do before round 1; what to journal about it."""
        ...

    def round_config(self) -> dict[str, Any]:
        """What every round's request carries for the nodes to encode their data."""
        ...

    def input_schema(self) -> dict[str, Any]:
        """What a served model needs to encode a caller's input as the nodes did."""
        ...

    def evaluate(
        self, grid: Grid, arrays: ArrayRecord, server_round: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The model's metrics after ``server_round`` ({} when not evaluated), and notes."""
        ...


class CentralInputs:
    """The coordinator's own held-out set (a validation slice when tuning)."""

    max_weight = math.inf  # a built-in task's nodes are as large as they are

    def __init__(self, cfg: RunConfig, task: Task) -> None:
        self.task = task
        validation = cfg.holdout == "validation"
        held_out = federate(task, 1, partitioner="iid", seed=cfg.seed, validation=validation)
        self.test = held_out.test
        self.normalization = held_out.normalization

    def prepare(self, grid: Grid) -> dict[str, Any]:
        return {}

    def round_config(self) -> dict[str, Any]:
        # A deployed node standardizes its own files with these, the very statistics its
        # simulated counterpart's partition was standardized with.
        return {f"normalization-{key}": list(values) for key, values in self.normalization.items()}

    def input_schema(self) -> dict[str, Any]:
        schema = self.task.input_schema(self.normalization)
        if self.normalization:  # the service measures input drift against these frequencies
            schema["drift_reference"] = histogram.reference(self.test.x)
        return schema

    def evaluate(
        self, grid: Grid, arrays: ArrayRecord, server_round: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        model = self.task.build_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, self.test, positive_class=self.task.positive_class)
        # the records behind the accuracy: the promotion gate compares counts, not rates
        return {**metrics, "examples": float(len(self.test))}, {}
