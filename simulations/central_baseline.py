"""Central DP-SGD baseline: the same model and budget, trained on all node data pooled.

The federated result is compared against this: what accuracy would the same (epsilon, delta)
buy if one party held every record? Usage::

    python simulations/central_baseline.py --task digits --epsilon 3 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics

from rich.console import Console
from rich.progress import track
from rich.table import Table

from fedaiot.experiments.central import train_central


def central_accuracy(
    task_name: str,
    epsilon: float | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
) -> tuple[float, float]:
    """Test accuracy and epsilon spent of central training (``epsilon=None``: non-private)."""
    outcome = train_central(
        task_name,
        epsilon,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        max_grad_norm=max_grad_norm,
        seed=seed,
    )
    return outcome.metrics["accuracy"], outcome.epsilon


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
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        rows.append(
            {
                "epsilon": epsilon,
                "mean": statistics.mean(accuracies),
                "sd": spread,
                "runs": accuracies,
            }
        )
    if args.json:
        print(json.dumps({"task": args.task, "central": rows}))
        return
    table = Table(title=f"central baseline, {args.task}, mean of {args.seeds} seeds")
    table.add_column("epsilon", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_column("sd", justify="right")
    table.add_column("per seed")
    for row in rows:
        label = "non-private" if row["epsilon"] is None else f"{row['epsilon']:g}"
        runs = " ".join(f"{a:.3f}" for a in row["runs"])
        table.add_row(label, f"{row['mean']:.4f}", f"{row['sd']:.4f}", runs)
    Console().print(table)


if __name__ == "__main__":
    main()
