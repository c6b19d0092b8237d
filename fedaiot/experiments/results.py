"""A sweep's results: tidy CSV files that survive interruption.

``results.csv`` holds one row per point: its whole setting, its status (``ok``, ``failed``,
``budget-exhausted``) with the error of a failed point, and what was measured. ``rounds.csv``
holds one row per (point, round) and ``node_rounds.csv`` one per (point, round, node). Rows are
appended and flushed to disk one at a time, so an interrupted sweep loses at most the point it
was running. A point recorded twice (a retried failure) counts by its last row.

A row's ``dp_mode`` is where its noise was added: ``local`` or ``distributed`` for a private
federated point, ``central`` for central DP-SGD, ``off`` for any non-private point. Files
written before the column existed are read as if it held ``local`` (private federated; the only
mode sweeps ran then), ``central`` or ``off``; appending to such a file first rewrites it with
the current columns, since rows under a shorter header would read as cut short.
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
    "dp_mode",
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
    # distributed DP: the largest epsilon of a node's own noise share alone
    "epsilon_local_max",
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
        "dp_mode": dp_mode(point.kind, point.private, point.dp_mode),
        "seed": point.seed,
        "rounds": point.rounds,
        "scenario": point.scenario,
        "config": json.dumps(point.model_dump(mode="json"), sort_keys=True),
    }


def dp_mode(kind: str, private: bool, recorded: str | None = "local") -> str:
    """A row's mode; ``recorded`` is None or empty where the file predates the column."""
    if not private:
        return "off"
    if kind == "central":
        return "central"
    return recorded or "local"


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
        if not fresh and self._header(name) != columns:
            self._upgrade(name, columns)
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
            rows = [dict(zip(header, row, strict=True)) for row in complete]
        if name == RESULTS and "dp_mode" not in header:
            for row in rows:
                private = math.isfinite(float(row["epsilon"]))
                row["dp_mode"] = dp_mode(row["kind"], private, None)
        return rows

    def _header(self, name: str) -> list[str]:
        with open(self.folder / name, newline="") as handle:
            return next(csv.reader(handle), [])

    def _upgrade(self, name: str, columns: list[str]) -> None:
        """Rewrite a file written with older columns under ``columns`` (atomically)."""
        header = self._header(name)
        extra = set(header) - set(columns)
        if extra:
            raise ValueError(
                f"{name}: unknown columns {sorted(extra)}: written by a newer fedaiot?"
            )
        path = self.folder / name
        temporary = path.with_suffix(".upgrading")
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for row in self.rows(name):
                writer.writerow([row.get(column, "") for column in columns])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def finished(self, *, include_failed: bool = True) -> dict[str, dict[str, str]]:
        """The last recorded row of each point; failed ones only with ``include_failed``."""
        latest = {row["point_id"]: row for row in self.rows()}
        if include_failed:
            return latest
        return {key: row for key, row in latest.items() if row["status"] != "failed"}
