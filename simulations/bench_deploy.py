"""Seconds per deployed round: a real SuperLink and N SuperNodes on 127.0.0.1, TLS and node
authentication, the kits' own commands; plain and secure rounds, the kits' fast paths against
Flower's stock behaviour.

Each configuration is a fresh federation: ``fedaiot provision``, each institution's file of the
task's bundled data (``fedaiot node demo-data``), ``fedaiot coordinator start`` and N times
``fedaiot node start``, as an operator runs them (``--stock-flower`` for the stock rows). The
round time is the coordinator's (journal ``seconds``: the exchanges, aggregation, evaluation on
the held-out set and the signed registration). Round 1 is left out of the statistics: it
advertises its keys in an exchange of its own and the nodes' runtimes warm up.

    .venv/bin/python simulations/bench_deploy.py [--nodes 3] [--rounds 12] [--stock-rounds 4]
        [--task breast-cancer] [--epsilon 1.0] [--skip-stock] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.provision import provision
from fedaiot.launch.processes import free_port, spawn, stop_tree

FEDAIOT = [sys.executable, "-m", "fedaiot"]
CEILING = 3600.0  # seconds a configuration may take before it is called failed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def federation(
    root: Path, *, nodes: int, rounds: int, task: str, epsilon: float, secure: bool, stock: bool
) -> dict[str, Any]:
    """One run to its end; the coordinator's round times and exchanges, rounds 2 onwards."""
    names = [f"site{i:02d}" for i in range(nodes)]
    pki = root / "pki"
    provision(pki, names)
    cfg = RunConfig(task=task, num_rounds=rounds, epsilon=epsilon, output_dir="unused")
    files = export(cfg, nodes, root / "data", names)
    run_config = root / "run.toml"
    run_config.write_text(
        f'task = "{task}"\nnum-rounds = {rounds}\nepsilon = {epsilon}\n'
        f"secure-aggregation = {'true' if secure else 'false'}\n"
    )
    port, state = free_port(), root / "state"
    flag = ["--stock-flower"] if stock else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = []
    try:
        coordinator_log = root / "coordinator.log"
        with open(coordinator_log, "ab") as log:
            coordinator = spawn(
                [
                    *FEDAIOT,
                    "coordinator",
                    "start",
                    "--run-config",
                    str(run_config),
                    "--pki",
                    str(pki),
                    "--state",
                    str(state),
                    "--port",
                    str(port),
                    "--json",
                    *flag,
                ],
                env,
                log,
            )
        started.append(coordinator)
        deadline = time.monotonic() + CEILING
        while f"institution {names[-1]}:" not in coordinator_log.read_text():
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: {coordinator_log}")
            time.sleep(0.2)
        for name, data in zip(names, files, strict=True):
            with open(root / f"node-{name}.log", "ab") as log:
                started.append(
                    spawn(
                        [
                            *FEDAIOT,
                            "node",
                            "start",
                            "--task",
                            task,
                            "--data",
                            str(data),
                            "--kit",
                            str(pki / "institutions" / name),
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--port",
                            str(free_port()),
                            *flag,
                        ],
                        env,
                        log,
                    )
                )
        code = coordinator.wait(timeout=CEILING)
        if code != 0:
            raise RuntimeError(f"the run failed ({code}): {coordinator_log}")
    finally:
        for process in reversed(started):
            stop_tree(process)
    journal = state / "runs" / task / "journal.jsonl"
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    played = [e for e in events if e["event"] == "round"]
    later = played[1:] or played
    seconds = [float(e["seconds"]) for e in later]
    return {
        "median_s": statistics.median(seconds),
        "p90_s": _percentile(seconds, 0.9),
        "first_s": float(played[0]["seconds"]),
        "exchanges": statistics.median(e.get("exchanges", 0) for e in later),
        "aggregated": sum(bool(e["aggregated"]) for e in played),
        "rounds": len(played),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--stock-rounds", type=int, default=4)
    parser.add_argument("--task", default="breast-cancer")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--skip-stock", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    plan = [("plain", False, False, args.rounds), ("secure", True, False, args.rounds)]
    if not args.skip_stock:
        plan.append(("stock_secure", True, True, args.stock_rounds))
    results: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds, "task": args.task}
    for name, secure, stock, rounds in plan:
        with tempfile.TemporaryDirectory(prefix=f"bench-deploy-{name}-") as folder:
            got = federation(
                Path(folder),
                nodes=args.nodes,
                rounds=rounds,
                task=args.task,
                epsilon=args.epsilon,
                secure=secure,
                stock=stock,
            )
        for key, value in got.items():
            results[f"{name}_{key}"] = value
        if not args.json:
            print(
                f"{name:>13}: median {got['median_s']:.2f} s, p90 {got['p90_s']:.2f} s a round "
                f"(rounds 2-{got['rounds']}, {got['exchanges']:g} exchanges; round 1 "
                f"{got['first_s']:.2f} s; {got['aggregated']} aggregated)",
                flush=True,
            )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
