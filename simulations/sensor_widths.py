"""How wide the 1-D sensor CNNs should be: validation accuracy and int8 size, side by side.

For each width (the channels of the classifier's two conv blocks; acsf1's stem conv scales
with them) it trains centrally, non-private, with bench_edge's fixed schedule, over
``--seeds``, and reports the mean validation accuracy (a stratified slice of the training pool:
the test set is never loaded) and the int8 artifact's size against the float graph's. The
width the tasks use was picked from this table (docs/operations.md, "Edge models").

    .venv/bin/python simulations/sensor_widths.py [--tasks basic-motions acsf1]
        [--widths 16,32 32,64 48,96] [--seeds 1 2 3 4 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from fedaiot.edge.export import Standardized, quantize_int8, to_onnx
from fedaiot.experiments.central import fit, pooled
from fedaiot.node.training import LocalSchedule
from fedaiot.tasks import federate, get_task
from fedaiot.tasks.evaluation import evaluate
from fedaiot.tasks.sensors import sensor_model

SCHEDULES = {"basic-motions": (60, 0.1), "acsf1": (200, 0.3)}  # bench_edge's: epochs, lr


def sizes(task_name: str, model: torch.nn.Module) -> tuple[int, int, int]:
    """Parameters, float graph bytes, int8 graph bytes."""
    task = get_task(task_name)
    channels = task.input_shape[0]
    module = Standardized(model, np.zeros(channels), np.ones(channels), len(task.input_shape))
    float_bytes = to_onnx(module, tuple(task.input_shape))
    params = sum(p.numel() for p in model.parameters())
    return params, len(float_bytes), len(quantize_int8(float_bytes))


def measure(task_name: str, widths: tuple[int, int], seeds: list[int]) -> dict[str, Any]:
    task = get_task(task_name)
    epochs, lr = SCHEDULES[task_name]
    accuracies, seconds = [], []
    for seed in seeds:
        data = federate(task, 1, partitioner="iid", seed=seed, validation=True)
        torch.manual_seed(seed)
        model = sensor_model(task_name, widths)
        started = time.perf_counter()
        schedule = LocalSchedule(epochs=epochs, batch_size=64, learning_rate=lr)
        fit(model, pooled(data), schedule, epsilon=None, delta=1e-5, max_grad_norm=1.0, seed=seed)
        seconds.append(time.perf_counter() - started)
        accuracies.append(evaluate(model, data.test)["accuracy"])
    params, float_size, int8_size = sizes(task_name, sensor_model(task_name, widths))
    return {
        "task": task_name,
        "widths": list(widths),
        "parameters": params,
        "validation_records": len(data.test),
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        "train_seconds_median": statistics.median(seconds),
        "onnx_bytes": float_size,
        "int8_bytes": int8_size,
        "int8_over_onnx": int8_size / float_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--widths", nargs="+", default=["16,32", "32,64", "48,96", "64,128"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| task | widths | parameters | validation accuracy (mean +- sd, n) | int8 / ONNX |")
    print("|---|---|---|---|---|")
    for task_name in args.tasks:
        for spec in args.widths:
            first, second = (int(w) for w in spec.split(","))
            row = measure(task_name, (first, second), args.seeds)
            rows.append(row)
            accuracy = f"{row['accuracy_mean']:.1%} +- {row['accuracy_sd']:.1%}"
            counts = f"{row['validation_records']} x {len(args.seeds)}"
            print(
                f"| {task_name} | {first}, {second} | {row['parameters']:,} | {accuracy} "
                f"({counts}) | {row['int8_over_onnx']:.1%} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
