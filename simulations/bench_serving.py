"""Throughput and latency of the inference service, next to the bare forward pass.

Starts ``fedaiot serve`` (uvicorn) in a subprocess on a free loopback port, with a signed
breast-cancer model in a temporary registry, and sends sequential ``POST /v1/predict`` requests
(one keep-alive httpx connection, a clinician token: label + probabilities) of 1 and 64 rows.
In the same run it times the bare torch forward pass of the same model on the same rows, with
one torch thread as the service uses (the floor), and ``GET /healthz`` (the HTTP floor: no
token, no body, no model). It prints requests per second, p50/p99 latency, and the latency the
service adds (service p50 - forward p50).

    .venv/bin/python simulations/bench_serving.py [--requests 2000] [--seconds 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

from fedaiot.registry.signing import generate_keypair, load_private_key, load_public_key
from fedaiot.registry.store import Manifest, ModelRegistry, NodePrivacy
from fedaiot.serving.auth import issue_token
from fedaiot.serving.models import load_model
from fedaiot.tasks import get_task

VERSION = "bench-r0001"


def build_registry(root: Path) -> tuple[Path, Path]:
    """Keys and a registry holding one signed breast-cancer model."""
    private_path, public_path = generate_keypair(root / "keys")
    task = get_task("breast-cancer")
    data = np.asarray(load_breast_cancer().data, dtype=np.float64)
    normalization = {"mean": data.mean(axis=0).tolist(), "std": data.std(axis=0).tolist()}
    torch.manual_seed(0)
    registry = ModelRegistry(root / "registry", signing_key=load_private_key(private_path))
    manifest = Manifest(
        version=VERSION,
        run="bench",
        task=task.name,
        architecture=task.architecture,
        input_schema=task.input_schema(normalization),
        round=1,
        metrics={"accuracy": 0.93},
        nodes=[NodePrivacy(id="node-0", examples=100, epsilon=1.0, delta=1e-5,
                           noise_multiplier=1.0, rounds=1)],
        config={"task": task.name},
        weights_sha256="",
        created=time.time(),
    )  # fmt: skip
    registry.register(task.build_model().state_dict(), manifest)
    return private_path, public_path


def timed(call: Callable[[], Any], requests: int, seconds: float) -> np.ndarray:
    """Latencies (s) of up to ``requests`` calls or ``seconds`` of calls, after a warm-up."""
    for _ in range(min(200, requests)):
        call()
    latencies = []
    deadline = time.perf_counter() + seconds
    for _ in range(requests):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
        if started > deadline:
            break
    return np.asarray(latencies)


def summary(latencies: np.ndarray) -> dict[str, float]:
    return {
        "n": float(latencies.size),
        "rps": float(latencies.size / latencies.sum()),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
    }


# The benchmark's clinicians are not limited: it measures latency, not the limits.
UNLIMITED = {
    "per_second": 1e9, "burst": 10**9, "rows_per_second": 1e9, "rows_burst": 10**9,
    "rows_per_day": 10**12,
}  # fmt: skip


def start_server(
    root: Path, public_key: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``fedaiot serve`` on a free loopback port; ``env`` adds FEDAIOT_SERVE_* settings."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = {"clinician": UNLIMITED}
    env = {**os.environ, "FEDAIOT_SERVE_RATE_LIMITS": json.dumps(limits), **(env or {})}
    command = [sys.executable, "-m", "fedaiot", "serve", "--registry", str(root / "registry")]
    command += ["--public-key", str(public_key), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/healthz", timeout=1).raise_for_status()
            return process, url
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per case (after warm-up)")
    parser.add_argument("--seconds", type=float, default=15.0, help="at most, per case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `fedaiot serve` does (--torch-threads, default 1)
    rows = np.asarray(load_breast_cancer().data, dtype=np.float64)  # as a client sends them
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        private_path, public_path = build_registry(root)
        model = load_model(ModelRegistry(root / "registry"), VERSION, load_public_key(public_path))
        token = issue_token(
            load_private_key(private_path), subject="bench", role="clinician", ttl_seconds=3600
        )
        process, url = start_server(root, public_path)
        try:
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
                health = timed(lambda: client.get("/healthz"), args.requests, args.seconds)
                results["healthz"] = {"service": summary(health)}
                for batch in (1, 64):
                    body = {"instances": rows[:batch].tolist()}
                    x = rows[:batch].astype(np.float32)

                    def predict(body: dict[str, Any] = body) -> None:
                        response = client.post("/v1/predict", json=body)
                        assert response.status_code == 200, response.text

                    def forward(x: np.ndarray = x) -> None:
                        with torch.inference_mode():
                            model.module(torch.from_numpy(x))

                    service = timed(predict, args.requests, args.seconds)
                    floor = timed(forward, args.requests, args.seconds)
                    results[f"{batch} row" + ("s" if batch > 1 else "")] = {
                        "service": summary(service),
                        "forward": summary(floor),
                    }
        finally:
            process.terminate()
            process.wait(10)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, sequential requests, loopback")
    header = "| case | req/s | p50 ms | p99 ms | forward p50 ms | forward p99 ms | added p50 ms |"
    print(header)
    print("|" + "---|" * 7)
    for case, result in results.items():
        s, f = result["service"], result.get("forward")
        forward = f"{f['p50_ms']:.3f} | {f['p99_ms']:.3f}" if f else "- | -"
        added = f"{s['p50_ms'] - f['p50_ms']:.3f}" if f else "-"
        row = f"| {case} | {s['rps']:.0f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {forward} |"
        print(f"{row} {added} |")


if __name__ == "__main__":
    main()
