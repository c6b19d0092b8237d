"""Institution files from a task's bundled data: to try a deployment, and to test one.

Node ``i`` of ``n`` gets exactly the raw (un-normalized) records of simulated partition ``i``
(same partitioner and seed as the run config), written in the layout ``fedaiot node start``
reads. A deployed node that standardizes them with the coordinator's statistics therefore
trains on the very arrays its simulated counterpart would.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.node.local_data import LABEL, TabularSchema, schema_of
from fedaiot.tasks import ArrayData, get_task
from fedaiot.tasks.partition import load_raw, plan_partitions


def raw_partitions(cfg: RunConfig, nodes: int) -> list[ArrayData]:
    task = get_task(cfg.task)
    plan = plan_partitions(
        task,
        nodes,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        cfg.classes_per_node,
        seed=cfg.seed,
    )
    pool, _ = load_raw(task)
    return [ArrayData(x=pool.x[index], y=pool.y[index]) for index in plan.partitions]


def write_institution_file(cfg: RunConfig, data: ArrayData, path: Path) -> Path:
    """``path`` with suffix ``.csv`` for tabular tasks, ``.npz`` otherwise."""
    task = get_task(cfg.task)
    schema = schema_of(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(schema, TabularSchema):
        path = path.with_suffix(".csv")
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*schema.features, LABEL])
            for row, label in zip(data.x, data.y, strict=True):
                # repr of the float32 as float64 reads back to the same float32 exactly
                writer.writerow([repr(float(v)) for v in row] + [task.class_names[int(label)]])
        return path
    path = path.with_suffix(".npz")
    np.savez(path, x=data.x, y=data.y)
    return path


def export(cfg: RunConfig, nodes: int, out: Path, names: list[str] | None = None) -> list[Path]:
    names = names or [f"node-{i}" for i in range(nodes)]
    if len(names) != nodes:
        raise BadInputError(f"{nodes} nodes but {len(names)} names")
    return [
        write_institution_file(cfg, part, Path(out) / name / "data")
        for name, part in zip(names, raw_partitions(cfg, nodes), strict=True)
    ]
