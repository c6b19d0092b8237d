"""Edge models side by side: size, accuracy and single-row latency of the float torch model,
its float ONNX export and its int8 ONNX export, per task.

For each task it trains a model centrally (non-private, a short fixed schedule: enough for a
model worth comparing, not a tuned one) on the training pool of the seed's split, registers it
signed in a temporary registry, and runs ``fedaiot export`` twice (``--quantize none`` and
``int8``). Accuracy is on the task's held-out test set (the parity record). Latency is one row
at a time, one thread each (torch under ``inference_mode``; onnxruntime with one intra-op
thread), interleaved in blocks so that a busy machine slows all three alike; it reports medians.
Instead of training, ``--registry R --version V`` benchmarks an existing version (e.g. one of
``fedaiot simulate``'s, signed with ``--key``).

    .venv/bin/python simulations/bench_edge.py [--tasks breast-cancer digits ...] [--calls 2000]
        [--registry R --version V --key K] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedaiot.edge.artifact import ArtifactManifest, edge_dir
from fedaiot.edge.build import export_version, standardized_module
from fedaiot.edge.parity import evaluation_set
from fedaiot.edge.runtime import OnnxRunner
from fedaiot.experiments.central import train_central
from fedaiot.registry.signing import generate_keypair, load_private_key
from fedaiot.registry.store import Manifest, ModelRegistry
from fedaiot.tasks import federate, get_task

TASKS = ("fashion-mnist", "basic-motions", "acsf1", "breast-cancer", "digits")
# (epochs, learning rate): plain SGD, batch 64, seed 42.
SCHEDULES = {
    "breast-cancer": (30, 0.1),
    "digits": (30, 0.1),
    "basic-motions": (60, 0.1),
    "acsf1": (200, 0.3),
    "fashion-mnist": (2, 0.1),
}
BOUNDS = {"fashion-mnist": 0.30, "basic-motions": 0.30, "acsf1": 0.30}  # else 0.50


def train(root: Path, key: Any, task_name: str) -> tuple[Path, str, float]:
    epochs, lr = SCHEDULES[task_name]
    started = time.perf_counter()
    outcome = train_central(
        task_name, None, epochs=epochs, batch_size=64, learning_rate=lr, max_grad_norm=1.0, seed=42
    )
    task = get_task(task_name)
    held_out = federate(task, 1, partitioner="iid", seed=42)
    registry = ModelRegistry(root / task_name, signing_key=key)
    version = f"{task_name}-r0001"
    registry.register(
        outcome.model.state_dict(),
        Manifest(
            version=version, run=task_name, task=task.name, architecture=task.architecture,
            input_schema=task.input_schema(held_out.normalization), round=1,
            metrics=outcome.metrics, config={"task": task.name, "seed": 42}, weights_sha256="",
            created=time.time(),
        ),
    )  # fmt: skip
    return registry.root, version, time.perf_counter() - started


def latencies(
    runs: dict[str, Callable[[], object]], calls: int, block: int = 100
) -> dict[str, float]:
    """Median milliseconds of one call of each, interleaved in blocks."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm up
        for _ in range(20):
            run()
    for _ in range(max(1, calls // block)):
        for name, run in runs.items():
            for _ in range(block):
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(root: Path, version: str, key: Any, calls: int) -> dict[str, Any]:
    exported: dict[str, ArtifactManifest] = {}
    for quantization in ("none", "int8"):
        exported[quantization] = export_version(root, version, key, quantization)[0]
    state, manifest = ModelRegistry(root).load(version, key.public_key())
    module = standardized_module(manifest, state)
    test, _ = evaluation_set(get_task(manifest.task), int(manifest.config.get("seed", 42)))
    row = np.ascontiguousarray(test.x[:1])
    folder = edge_dir(root / "versions" / version)
    runners = {q: OnnxRunner((folder / f"{a.name}.onnx").read_bytes()) for q, a in exported.items()}
    tensor = torch.from_numpy(row)

    def torch_call() -> object:
        with torch.inference_mode():
            return module(tensor)

    medians = latencies(
        {"torch": torch_call, "onnx": lambda: runners["none"](row),
         "onnx-int8": lambda: runners["int8"](row)},
        calls,
    )  # fmt: skip
    float_, int8 = exported["none"], exported["int8"]
    return {
        "task": manifest.task,
        "version": version,
        "test_records": int8.parity.examples,
        "bytes": {
            "torch": int8.reference_sizes["torch_safetensors"],
            "onnx": float_.size_bytes,
            "onnx-int8": int8.size_bytes,
        },
        "int8_over_onnx": int8.size_bytes / float_.size_bytes,
        "int8_over_torch": int8.size_bytes / int8.reference_sizes["torch_safetensors"],
        "accuracy": {
            "torch": int8.parity.accuracy_torch,
            "onnx": float_.parity.accuracy_artifact,
            "onnx-int8": int8.parity.accuracy_artifact,
        },
        "int8_accuracy_change_points": int8.parity.accuracy_change_points,
        "int8_max_probability_difference": int8.parity.max_abs_probability_difference,
        "int8_label_agreement": int8.parity.label_agreement,
        "latency_median_ms": medians,
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| task | torch KB | ONNX KB | int8 KB | int8/ONNX | int8/torch | bound | accuracy torch"
        " -> int8 (points) | max prob diff | torch ms | ONNX ms | int8 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        b, a, m = r["bytes"], r["accuracy"], r["latency_median_ms"]
        bound = BOUNDS.get(r["task"], 0.50)
        lines.append(
            f"| {r['task']} | {b['torch'] / 1000:.1f} | {b['onnx'] / 1000:.1f} | "
            f"{b['onnx-int8'] / 1000:.1f} | {r['int8_over_onnx']:.1%} | {r['int8_over_torch']:.1%}"
            f" | {bound:.0%} | {a['torch']:.2%} -> {a['onnx-int8']:.2%} "
            f"({r['int8_accuracy_change_points']:+.2f}) | "
            f"{r['int8_max_probability_difference']:.3f} | {m['torch']:.3f} | "
            f"{m['onnx']:.3f} | {m['onnx-int8']:.3f} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--calls", type=int, default=2000, help="single-row calls per runtime")
    parser.add_argument("--registry", type=Path, help="benchmark this registry's --version")
    parser.add_argument("--version")
    parser.add_argument("--key", type=Path, help="the private key that signed --registry")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedaiot-bench-edge-") as folder:
        if args.registry is not None:
            if not (args.version and args.key):
                sys.exit("--registry needs --version and --key")
            results.append(
                bench(args.registry, args.version, load_private_key(args.key), args.calls)
            )
        else:
            key = load_private_key(generate_keypair(Path(folder) / "keys")[0])
            for task_name in args.tasks:
                root, version, seconds = train(Path(folder), key, task_name)
                print(f"{task_name}: trained in {seconds:.0f} s", file=sys.stderr)
                results.append(bench(root, version, key, args.calls))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, one thread each, "
          f"single-row latency medians of {args.calls} calls")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
