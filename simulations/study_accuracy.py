"""A study federated with local DP, with distributed DP, and pooled, on the same test rows.

For each seed it runs the study through the real coordinator and ClientApp code in-process
(no Ray: many short runs), once with each DP mode, and measures every final model exactly on
every site's held-out test rows (a simulator holds them; no coordinator does). Beside them:
logistic regression and DP-SGD on the pooled training rows (``study_baselines``). Prints the
table the README shows, mean ± sd over seeds::

    fedaiot study demo-data pima-diabetes --study simulations/studies/pima-diabetes.toml \\
        --sites 3 --out pima.csv
    python simulations/study_accuracy.py --study simulations/studies/pima-diabetes.toml \\
        --data pima.csv --epsilon 1 --seeds 1 2 3 4 5 \\
        --local learning-rate=3.0 sample-rate=1.0 num-rounds=20 \\
        --distributed learning-rate=1.0 sample-rate=0.5 num-rounds=60

The hyperparameters of each mode are picked on a validation split first
(``simulations/tune.py --set holdout=validation ...``), never on these test rows.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedaiot.config.run import RunConfig
from fedaiot.experiments.study_baselines import exact_metrics, pooled_baselines
from fedaiot.node.study_round import simulated_sites
from fedaiot.simulation.inprocess import run_inprocess


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        pairs[key] = value
    return pairs


def _config(args: argparse.Namespace, mode: str, seed: int, folder: Path) -> RunConfig:
    base = RunConfig.from_run_config(
        {"study": str(args.study), "study-data": str(args.data), "site-column": args.site_column}
    )
    sites = len(simulated_sites(base))
    overrides = _pairs(args.local if mode == "local" else args.distributed)
    return RunConfig.from_run_config(
        {
            "study": str(args.study),
            "study-data": str(args.data),
            "site-column": args.site_column,
            "epsilon": args.epsilon,
            "dp-mode": mode,
            "seed": seed,
            "min-available-nodes": sites,
            "min-train-nodes": sites,
            "output-dir": str(folder / f"{mode}-{seed}"),
            **overrides,
        }
    )


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--site-column", default="site")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--local", nargs="*", default=[], help="run-config key=value")
    parser.add_argument("--distributed", nargs="*", default=[], help="run-config key=value")
    args = parser.parse_args()

    console = Console()
    measured: dict[str, list[float]] = {
        "federated, local DP": [],
        "federated, distributed DP": [],
        "pooled DP-SGD": [],
        "pooled logistic regression (non-private)": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="fedaiot-study-"))
    try:
        for seed in args.seeds:
            for mode, row in (("local", "federated, local DP"),
                              ("distributed", "federated, distributed DP")):  # fmt: skip
                cfg = _config(args, mode, seed, scratch)
                summary = run_inprocess(cfg, cfg.min_available_nodes)
                exact: dict[str, Any] = exact_metrics(cfg)
                if summary["status"] in ("completed", "budget-exhausted") and exact:
                    measured[row].append(float(exact["pooled"]["accuracy"]))
                console.print(f"seed {seed}, {mode}: {summary['status']}, {exact.get('pooled')}")
            baselines = pooled_baselines(cfg)
            measured["pooled DP-SGD"].append(float(baselines["pooled_dp_sgd"]["accuracy"]))
            measured["pooled logistic regression (non-private)"].append(
                float(baselines["pooled_logistic_regression"]["accuracy"])
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = Table(title=f"{args.study.stem}: test accuracy at epsilon {args.epsilon:g}, "
                  f"seeds {args.seeds}")  # fmt: skip
    table.add_column("training")
    table.add_column("accuracy %", justify="right")
    table.add_column("per seed")
    for row, values in measured.items():
        table.add_row(row, _cell(values), " ".join(f"{100 * v:.1f}" for v in values))
    console.print(table)


if __name__ == "__main__":
    main()
