"""Membership inference against non-private and DP-trained models: does DP push AUC to 0.5?

Two modes, labelled as such in the output:

* ``federated`` (default): each setting is a real run, ``fedaiot simulate`` in a subprocess
  (Flower's simulation engine, the coordinator, the registry); its registered global model is
  attacked with :func:`fedaiot.experiments.membership.attack_run`. Every record of the task
  trains the model, which on these small, easy tasks leaks little even without DP.
* ``central``: one party trains the task's own model with fedaiot's ``train_plain`` /
  ``train_private`` on a random subset of ``--records`` pooled training records: the
  small-data regime where a non-private model memorizes and the attack has something to find.
  Repeated over ``--seeds`` seeds (mean +- standard deviation).

Usage::

    python simulations/membership_inference.py --task digits --epsilon 1 4 8
    python simulations/membership_inference.py --mode central --records 150 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedaiot.experiments.central import fit
from fedaiot.experiments.membership import MembershipResult, attack, attack_run
from fedaiot.node.training import LocalSchedule
from fedaiot.registry.store import ModelRegistry
from fedaiot.tasks import ArrayData, federate, get_task
from fedaiot.tasks.evaluation import evaluate


@dataclass(frozen=True)
class Measured:
    epsilon: float  # spent (largest over nodes); inf when non-private
    test_accuracy: float
    result: MembershipResult


def run_federated(
    args: argparse.Namespace, epsilon: float | None, seed: int, log: Path
) -> Measured:
    """One ``fedaiot simulate`` run (resumed if its folder holds it already), then the attack."""
    label = "nodp" if epsilon is None else f"eps{epsilon:g}"
    name = f"{args.task}-n{args.nodes}-r{args.rounds}-le{args.local_epochs}-{label}-s{seed}"
    out = args.output / name
    command = [
        *(sys.executable, "-m", "fedaiot", "simulate", "--task", args.task),
        *("--nodes", str(args.nodes), "--rounds", str(args.rounds)),
        *("--local-epochs", str(args.local_epochs), "--batch-size", str(args.batch_size)),
        *("--lr", str(args.lr), "--partitioner", args.partitioner, "--seed", str(seed)),
        # The coordinator's sum is the same with or without SecAgg+; off saves minutes a run.
        *("--secure-aggregation", "off", "--output", str(out), "--json"),
        *(["--no-dp"] if epsilon is None else ["--dp", "local", "--epsilon", str(epsilon)]),
    ]
    with open(log, "ab") as sink:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): see {log}")
    summary = json.loads(done.stdout)
    registry = ModelRegistry(out / "registry")
    manifest = registry.manifest(registry.refs()["latest"])
    spent = [n.epsilon for n in manifest.nodes if n.epsilon is not None]
    return Measured(
        epsilon=max(spent) if spent else float("inf"),
        test_accuracy=float(summary["accuracy"]),
        result=attack_run(out, seed=seed),
    )


def run_central(args: argparse.Namespace, epsilon: float | None, seed: int) -> Measured:
    """Central training of the task's model on ``args.records`` pooled records, then the attack."""
    task = get_task(args.task)
    fed = federate(task, 1, partitioner="iid", seed=seed)
    pool = fed.partitions[0]
    pick = np.random.default_rng(seed).choice(len(pool), min(args.records, len(pool)), False)
    members = ArrayData(x=pool.x[pick], y=pool.y[pick])
    torch.manual_seed(seed)
    model = task.build_model()
    epochs = args.rounds * args.local_epochs
    schedule = LocalSchedule(epochs=epochs, batch_size=args.batch_size, learning_rate=args.lr)
    spent = fit(
        model,
        members,
        schedule,
        epsilon=epsilon,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        seed=seed,
        max_noise=200.0,
    )
    accuracy = evaluate(model, fed.test, positive_class=task.positive_class)["accuracy"]
    return Measured(spent, accuracy, attack(model, members, fed.test, seed=seed))


def _cell(values: Sequence[float], digits: int = 3) -> str:
    if all(math.isinf(v) for v in values):
        return "∞"
    if len(values) == 1 or len(set(values)) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(title: str, rows: dict[str, list[Measured]]) -> Table:
    out = Table(title=title)
    for column in ("setting", "ε spent", "test acc", "member acc", "loss AUC", "calibrated AUC"):
        out.add_column(column, justify="right")
    out.add_column("TPR @ 1% FPR", justify="right")
    out.add_column("n per side", justify="right")
    for label, runs in rows.items():
        out.add_row(
            label,
            _cell([m.epsilon for m in runs], 2),
            _cell([m.test_accuracy for m in runs]),
            _cell([m.result.member_accuracy for m in runs]),
            _cell([m.result.loss_auc for m in runs]),
            _cell([m.result.calibrated_auc for m in runs]),
            _cell([m.result.tpr_at_1pct_fpr for m in runs]),
            str(runs[0].result.n_members),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("federated", "central"), default="federated")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3, help="federated: simulated nodes")
    parser.add_argument("--rounds", type=int, default=5, help="central: epochs = rounds x local")
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="central only")
    parser.add_argument("--delta", type=float, default=1e-5, help="central only")
    parser.add_argument("--partitioner", default="iid", help="federated only")
    parser.add_argument("--records", type=int, default=150, help="central: training records")
    parser.add_argument("--output", type=Path, default=Path("/tmp/fedaiot-membership"))
    args = parser.parse_args()
    # Opacus warns when the RDP optimum is at its largest order (tiny epsilon, huge noise): the
    # epsilon reported is then an upper bound, which is what the table means by it anyway.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    torch.set_num_threads(1)  # tiny models: a thread pool only fights the other processes

    args.output.mkdir(parents=True, exist_ok=True)
    log = args.output / "simulate.log"
    settings: list[float | None] = [None, *args.epsilon]
    rows: dict[str, list[Measured]] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"{args.mode} runs", total=len(settings) * args.seeds)
        for epsilon in settings:
            label = "non-private" if epsilon is None else f"ε = {epsilon:g}"
            for seed in range(args.seeds):
                progress.update(bar, description=f"{label}, seed {seed}")
                if args.mode == "federated":
                    measured = run_federated(args, epsilon, seed, log)
                else:
                    measured = run_central(args, epsilon, seed)
                rows.setdefault(label, []).append(measured)
                progress.advance(bar)
    if args.mode == "federated":
        title = (
            f"membership inference, federated ({args.task}, {args.nodes} {args.partitioner} "
            f"nodes, {args.rounds} rounds x {args.local_epochs} local epochs)"
        )
    else:
        title = (
            f"membership inference, CENTRAL training ({args.task}, {args.records} records, "
            f"{args.rounds * args.local_epochs} epochs)"
        )
    if args.seeds > 1:
        title += f", mean ± sd of {args.seeds} seeds"
    console = Console()
    if not console.is_terminal:  # piped into a file or a report: do not wrap at 80 columns
        console.width = 140
    console.print(table(title, rows))


if __name__ == "__main__":
    main()
