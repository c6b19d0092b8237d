"""Pick hyperparameters on a validation split, never on the test set.

Every combination of the ``--grid`` values runs with ``holdout = "validation"``: the coordinator
evaluates on a stratified slice of the training pool and the task's test set is never loaded
into any decision. Runs go through the real coordinator and ClientApp code in-process (no Ray:
many short runs), over ``--seeds``; the table shows the mean and spread of the final validation
accuracy, and the best combination is printed last (and written to ``--json``)::

    python simulations/tune.py --task digits --nodes 10 --rounds 30 --epsilon 3 \\
        --grid learning-rate=0.1,0.3,0.6 --grid sample-rate=0.1,0.2 --seeds 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedaiot.config.run import RunConfig
from fedaiot.errors import FedaiotError
from fedaiot.simulation.inprocess import run_inprocess


def _grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid takes key=v1,v2,..., got {item!r}")
        grid[key] = values.split(",")
    return grid


def _validation_accuracy(base: dict[str, Any], nodes: int, folder: Path) -> float:
    cfg = RunConfig.from_run_config(
        {**base, "holdout": "validation", "output-dir": str(folder), "min-available-nodes": nodes}
    )
    try:
        summary = run_inprocess(cfg, nodes)
    except FedaiotError as exc:  # e.g. no budget left for a study's statistics
        print(f"failed: {exc}")
        return float("nan")
    if summary["status"] not in ("completed", "budget-exhausted"):
        return float("nan")
    if cfg.study:  # a study's coordinator sees DP-noised counts: measure the model exactly
        from fedaiot.experiments.study_baselines import exact_metrics

        measured = exact_metrics(cfg)
        return float(measured["pooled"]["accuracy"]) if measured else float("nan")
    return float(summary["accuracy"])  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=10, help="a study: its number of sites")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="key=value (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, help="write every result and the pick here")
    args = parser.parse_args()

    fixed = dict(item.split("=", 1) for item in args.set)
    base = {
        "task": args.task,
        "num-rounds": args.rounds,
        "epsilon": args.epsilon,
        "private": not args.no_dp,
        **fixed,
    }
    grid = _grid(args.grid)
    console = Console()
    rows: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix="fedaiot-tune-"))
    try:
        for values in itertools.product(*grid.values()):
            combo = dict(zip(grid, values, strict=True))
            scores = []
            for seed in args.seeds:
                started = time.perf_counter()
                folder = scratch / f"run-{len(rows)}-{seed}"
                accuracy = _validation_accuracy({**base, **combo, "seed": seed}, args.nodes, folder)
                scores.append(accuracy)
                console.print(
                    f"{combo} seed {seed}: validation accuracy {accuracy:.4f} "
                    f"({time.perf_counter() - started:.0f} s)",
                    highlight=False,
                )
            failed = any(math.isnan(v) for v in scores)  # a setting the budget cannot pay for
            rows.append(
                {
                    **combo,
                    "mean": math.nan if failed else statistics.mean(scores),
                    "sd": math.nan if failed or len(scores) < 2 else statistics.stdev(scores),
                    "scores": scores,
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    what = Path(fixed["study"]).stem if fixed.get("study") else args.task
    table = Table(title=f"{what}: validation accuracy over seeds {args.seeds}")
    for key in grid:
        table.add_column(key)
    table.add_column("mean", justify="right")
    table.add_column("sd", justify="right")
    for row in sorted(rows, key=lambda r: -r["mean"]):
        table.add_row(*(str(row[k]) for k in grid), f"{row['mean']:.4f}", f"{row['sd']:.4f}")
    console.print(table)
    best = max(rows, key=lambda r: -1.0 if math.isnan(r["mean"]) else r["mean"])
    pick = {k: best[k] for k in grid}
    console.print(f"best on validation: {pick} ({best['mean']:.4f})", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"base": base, "rows": rows, "pick": pick}, indent=2))


if __name__ == "__main__":
    main()
