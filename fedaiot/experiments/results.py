"""A sweep's results: tidy CSV files that survive interruption.

``results.csv`` holds one row per point: its whole setting, its status (``ok``, ``failed``,
``budget-exhausted``) with the error of a failed point, and what was measured. ``rounds.csv``
holds one row per (point, round) and ``node_rounds.csv`` one per (point, round, node). Rows are
appended and flushed to disk one at a time, so an interrupted sweep loses at most the point it
was running. A point recorded twice (a retried failure) counts by its last row.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedaiot.experiments.spec import Point

RESULTS, ROUNDS, NODE_ROUNDS = "results.csv", "rounds.csv", "node_rounds.csv"

POINT_COLUMNS = [
    "point_id",
    "kind",
    "task",
    "epsilon",
    "private",
    "nodes",
    "partition",
    "secure_aggregation",
    "seed",
    "rounds",
    "scenario",
]
RESULT_COLUMNS = [
    *POINT_COLUMNS,
    "status",
    "error",
    "accuracy",
    "loss",
    "auc",
    "epsilon_spent_max",
    "epsilon_spent_mean",
    "rounds_completed",
    "mia_loss_auc",
    "mia_calibrated_auc",
    "mia_tpr_at_1pct_fpr",
    "wall_seconds",
    "run_dir",
    "config",
]
ROUND_COLUMNS = [
    "point_id",
    "round",
    "accuracy",
    "loss",
    "seconds",
    "trained",
    "refused",
    "failed",
    "epsilon_spent_max",
]
NODE_ROUND_COLUMNS = ["point_id", "round", "node", "status", "epsilon", "budget"]


def point_fields(point: Point) -> dict[str, Any]:
    return {
        "point_id": point.id,
        "kind": point.kind,
        "task": point.task,
        "epsilon": point.epsilon,
        "private": point.private,
        "nodes": point.nodes,
        "partition": point.partition,
        "secure_aggregation": point.secure_aggregation,
        "seed": point.seed,
        "rounds": point.rounds,
        "scenario": point.scenario,
        "config": json.dumps(point.model_dump(mode="json"), sort_keys=True),
    }


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # "inf" round-trips; repr keeps every digit
    return str(value)


class ResultsStore:
    """The three CSV files of a sweep folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _append(self, name: str, columns: list[str], rows: Iterable[Mapping[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        fresh = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if fresh:
                writer.writerow(columns)
            for row in rows:
                unknown = set(row) - set(columns)
                if unknown:
                    raise ValueError(f"{name}: unknown columns {sorted(unknown)}")
                writer.writerow([_cell(row.get(column)) for column in columns])
            handle.flush()
            os.fsync(handle.fileno())

    def record(
        self,
        result: Mapping[str, Any],
        rounds: Iterable[Mapping[str, Any]] = (),
        node_rounds: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """Write a finished point: its rounds first, its result row last (the commit mark)."""
        self._append(ROUNDS, ROUND_COLUMNS, rounds)
        self._append(NODE_ROUNDS, NODE_ROUND_COLUMNS, node_rounds)
        self._append(RESULTS, RESULT_COLUMNS, [result])

    def rows(self, name: str = RESULTS) -> list[dict[str, str]]:
        """The file's complete rows (a line cut short by a crash is skipped)."""
        path = self.folder / name
        if not path.exists():
            return []
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return []
            complete = (row for row in reader if len(row) == len(header))
            return [dict(zip(header, row, strict=True)) for row in complete]

    def finished(self, *, include_failed: bool = True) -> dict[str, dict[str, str]]:
        """The last recorded row of each point; failed ones only with ``include_failed``."""
        latest = {row["point_id"]: row for row in self.rows()}
        if include_failed:
            return latest
        return {key: row for key, row in latest.items() if row["status"] != "failed"}
