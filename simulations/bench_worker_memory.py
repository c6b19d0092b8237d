"""A long-lived node process's memory over the rounds, with and without handing its freed heap
back (``fedaiot.node.memory``), side by side.

One process plays every node, as one Ray worker serves many simulated nodes for a whole run:
the real ClientApp handlers through ``InProcessGrid``, secure aggregation and local DP, the
coordinator's ``RoundLoop``. After each round it notes the process's resident and private
memory (psutil). Each variant runs in a fresh process, so that neither inherits the other's
heap::

    python simulations/bench_worker_memory.py --task fashion --nodes 10 --rounds 8
    python simulations/bench_worker_memory.py --task digits --rounds 10 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

GIB = 1024**3


def _one(task: str, nodes: int, rounds: int, sample_rate: float) -> list[dict[str, float]]:
    import psutil
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedaiot.config.run import RunConfig
    from fedaiot.rounds.loop import RoundLoop
    from fedaiot.simulation.inprocess import InProcessGrid

    # What a running Flower process would have set, for Messages to be made.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    process = psutil.Process()
    readings: list[dict[str, float]] = []

    class MeasuredGrid(InProcessGrid):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            messages = list(messages)
            replies = list(super().send_and_receive(messages, timeout=timeout))
            if any(m.metadata.message_type.endswith("unmask") for m in messages):
                info = process.memory_full_info()
                readings.append({"rss_gb": info.rss / GIB, "private_gb": info.uss / GIB})
            return replies

    with tempfile.TemporaryDirectory() as folder:
        cfg = RunConfig(
            task=task,
            num_rounds=rounds,
            min_available_nodes=nodes,
            sample_rate=sample_rate,
            epsilon=10.0,
            output_dir=folder,
        )
        RoundLoop(cfg).run_rounds(MeasuredGrid(cfg, nodes))
    return readings


def _variant(args: argparse.Namespace, keep_freed: bool) -> list[dict[str, float]]:
    env = dict(os.environ)
    env.pop("FEDAIOT_KEEP_FREED_HEAP", None)
    if keep_freed:
        env["FEDAIOT_KEEP_FREED_HEAP"] = "1"
    command = [
        sys.executable, __file__, "--task", args.task, "--nodes", str(args.nodes),
        "--rounds", str(args.rounds), "--sample-rate", str(args.sample_rate), "--child",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the measured run failed:\n{done.stderr[-3000:]}")
    readings: list[dict[str, float]] = json.loads(done.stdout.splitlines()[-1])
    return readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sample-rate", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(args.task, args.nodes, args.rounds, args.sample_rate)))
        return
    result: dict[str, Any] = {"task": args.task, "nodes": args.nodes, "rounds": args.rounds}
    for name, keep in (("trimmed", False), ("kept", True)):
        readings = _variant(args, keep)
        private = [r["private_gb"] for r in readings]
        result[name] = {
            "private_gb_per_round": [round(p, 3) for p in private],
            "growth_gb_per_round": statistics.median(
                [b - a for a, b in itertools.pairwise(private)] or [0.0]
            ),
            "last_private_gb": private[-1],
        }
        print(f"{name:8s} private GB after each round: {result[name]['private_gb_per_round']}")
    ratio = result["kept"]["last_private_gb"] / result["trimmed"]["last_private_gb"]
    result["kept_over_trimmed"] = ratio
    print(f"last round: kept / trimmed = {ratio:.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
