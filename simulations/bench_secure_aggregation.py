"""What secure aggregation costs per round, measured side by side through Flower's simulation.

For each (nodes, parameters) it runs the same ``fedaiot simulate`` twice, with secure
aggregation on and off (task ``synthetic-<P>``, IID partitions; plain local SGD unless
``--dp``, so that the rounds are mostly aggregation, as in
``bench_flower_secaggplus.py``, the reference). It reports
the median round time of rounds 2 and later, since round 1 pays for Ray and the actors to start,
and the ratio of the two. It also reports the time of each secure stage and the bytes each node
sends in a round. The bytes come from the protocol's own records, counted in an in-memory round
of the same size.

    python simulations/bench_secure_aggregation.py                  # 10/20/50 nodes, 100k/1M
    python simulations/bench_secure_aggregation.py --nodes 20 --params 1000000 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fedaiot.secagg import RoundTrace, run_round_in_memory


def run(
    nodes: int, params: int, rounds: int, secure: bool, folder: Path, dp: bool
) -> dict[str, Any]:
    out = folder / f"n{nodes}-p{params}-{'on' if secure else 'off'}"
    command = [
        sys.executable, "-m", "fedaiot", "simulate", "--task", f"synthetic-{params}",
        "--nodes", str(nodes), "--rounds", str(rounds), "--partitioner", "iid",
        "--secure-aggregation", "on" if secure else "off", "--output", str(out), "--json",
        *(["--dp", "local"] if dp else ["--no-dp"]),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    events = [json.loads(line) for line in (out / "journal.jsonl").open()]
    laps = [e for e in events if e["event"] == "round"][1:]
    stages: dict[str, float] = {}
    for name in ("advertise", "share", "train", "unmask"):  # train: training and masking
        values = [e["stage_seconds"][name] for e in laps if name in e.get("stage_seconds", {})]
        if values:
            stages[name] = statistics.median(values)
    return {"round": statistics.median(e["seconds"] for e in laps), "stages": stages}


def bytes_per_node(nodes: int, params: int) -> tuple[float, float]:
    """Median bytes a node sends in one round: secure (every stage's record) and plain."""
    trace = RoundTrace()
    vectors = {i: np.zeros(params) for i in range(1, nodes + 1)}
    run_round_in_memory(vectors, dict.fromkeys(vectors, 1.0), trace=trace)
    return statistics.median(trace.sent.values()), 4.0 * params  # plain: float32 weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--dp",
        action="store_true",
        help="train with DP-SGD (default: plain SGD, so that the "
        "round time is mostly aggregation, as in Flower's reference benchmark)",
    )
    args = parser.parse_args()

    console = Console(stderr=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedaiot-bench-") as tmp:
        for params in args.params:
            for nodes in args.nodes:
                console.print(f"{nodes} nodes, {params:,} parameters ...")
                on = run(nodes, params, args.rounds, True, Path(tmp), args.dp)
                off = run(nodes, params, args.rounds, False, Path(tmp), args.dp)
                secure_bytes, plain_bytes = bytes_per_node(nodes, params)
                ratio = on["round"] / off["round"] if "round" in on and "round" in off else None
                rows.append({"nodes": nodes, "params": params, "secure": on, "plain": off,
                             "ratio": ratio, "bytes_secure": secure_bytes,
                             "bytes_plain": plain_bytes})  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return
    table = Table(title="round time, secure aggregation vs plain FedAvg (median of rounds 2+)")
    for column in ("nodes", "params", "plain s", "secure s", "ratio", "train / share / mask / "
                   "unmask s", "bytes/node secure", "bytes/node plain"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        on, off = row["secure"], row["plain"]
        stages = " / ".join(f"{v:.2f}" for v in on.get("stages", {}).values())
        table.add_row(
            str(row["nodes"]), f"{row['params']:,}",
            f"{off['round']:.2f}" if "round" in off else off.get("error", "-"),
            f"{on['round']:.2f}" if "round" in on else on.get("error", "-"),
            f"{row['ratio']:.2f}" if row["ratio"] else "-", stages,
            f"{row['bytes_secure']:,.0f}", f"{row['bytes_plain']:,.0f}",
        )  # fmt: skip
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
