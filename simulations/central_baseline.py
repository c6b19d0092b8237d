"""Central DP-SGD baseline: the same model and budget, trained on all node data pooled.

The federated result is compared against this: what accuracy would the same (epsilon, delta)
buy if one party held every record? Usage::

    python simulations/central_baseline.py --task digits --epsilon 3 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from fedaiot.privacy.accounting import epsilon_spent, plan_noise
from fedaiot.tasks import ArrayData, federate, get_task
from fedaiot.training import (
    LocalSchedule,
    batches_per_epoch,
    evaluate,
    sample_rate,
    train_plain,
    train_private,
)


def central_accuracy(
    task_name: str,
    epsilon: float | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
    delta: float = 1e-5,
) -> tuple[float, float]:
    """Test accuracy and epsilon spent of central training (``epsilon=None``: non-private)."""
    task = get_task(task_name)
    fed = federate(task, 1, partitioner="iid", seed=seed)
    pool = ArrayData(
        np.concatenate([p.x for p in fed.partitions]), np.concatenate([p.y for p in fed.partitions])
    )
    torch.manual_seed(seed)
    model = task.build_model()
    schedule = LocalSchedule(epochs=epochs, batch_size=batch_size, learning_rate=lr)
    if epsilon is None:
        train_plain(model, pool, schedule, seed=seed)
        spent = float("inf")
    else:
        q = sample_rate(len(pool), batch_size)
        steps = epochs * batches_per_epoch(len(pool), batch_size)
        sigma = plan_noise(target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps)
        outcome = train_private(
            model,
            pool,
            schedule,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            history=[],
            seed=seed,
        )
        spent = epsilon_spent(outcome.history, delta)
    return evaluate(model, fed.test, positive_class=task.positive_class)["accuracy"], spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    settings: list[float | None] = [None, *args.epsilon]
    for epsilon in settings:
        accuracies = [
            central_accuracy(
                args.task,
                epsilon,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                max_grad_norm=args.max_grad_norm,
                seed=seed,
            )[0]
            for seed in track(range(args.seeds), description=f"epsilon {epsilon or 'inf'}")
        ]
        rows.append(
            {"epsilon": epsilon, "median": statistics.median(accuracies), "runs": accuracies}
        )
    if args.json:
        print(json.dumps({"task": args.task, "central": rows}))
        return
    table = Table(title=f"central baseline, {args.task}, median of {args.seeds} seeds")
    table.add_column("epsilon", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_column("per seed")
    for row in rows:
        label = "non-private" if row["epsilon"] is None else f"{row['epsilon']:g}"
        table.add_row(label, f"{row['median']:.4f}", " ".join(f"{a:.3f}" for a in row["runs"]))
    Console().print(table)


if __name__ == "__main__":
    main()
