"""Rounds per second of distributed-DP runs through Flower's simulation engine, side by side.

A distributed round is one DP-SGD step: four secure-aggregation exchanges with every sampled
node and little training, so the round is mostly message passing. This runs the same digits
job (10 nodes, Dirichlet 0.5, distributed DP at epsilon 3, the sweep's settings) with the
coordinator's grid polling for replies every 5 ms (fedaiot's default) and every 100 ms
(Flower's), alternating, and prints the median round time of each and the whole wall time::

    python simulations/bench_distributed_rounds.py --rounds 90 --repeats 2
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


def _run(folder: Path, rounds: int, poll: float) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "fedaiot", "simulate", "--task", "digits", "--nodes", "10",
        "--rounds", str(rounds), "--dp", "distributed", "--epsilon", "3",
        "--sample-rate", "0.2", "--lr", "2.0", "--set", f"simulation-poll={poll}",
        "--output", str(folder), "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"simulate failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    events = [json.loads(x) for x in (folder / "journal.jsonl").read_text().splitlines()]
    seconds = [e["seconds"] for e in events if e["event"] == "round"]
    return {
        "poll_s": poll,
        "round_median_s": statistics.median(seconds),
        "round_p90_s": sorted(seconds)[int(0.9 * (len(seconds) - 1))],
        "rounds_per_s": 1 / statistics.median(seconds),
        "wall_s": summary["wall_seconds"],
        "accuracy": summary["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[float, list[dict[str, Any]]] = {0.005: [], 0.1: []}
    with tempfile.TemporaryDirectory(prefix="fedaiot-bench-") as scratch:
        for repeat in range(args.repeats):
            for poll in results:  # alternate, so that a busy spell hits both
                folder = Path(scratch) / f"run-{poll}-{repeat}"
                results[poll].append(_run(folder, args.rounds, poll))
    rows = {
        poll: {
            key: statistics.median(r[key] for r in runs)
            for key in ("round_median_s", "round_p90_s", "rounds_per_s", "wall_s", "accuracy")
        }
        for poll, runs in results.items()
    }
    if args.json:
        print(json.dumps({"rounds": args.rounds, "repeats": args.repeats, "by_poll": rows}))
        return
    print(f"digits, 10 nodes, distributed DP, {args.rounds} rounds, {args.repeats} repeat(s)")
    print("poll (s)  round median (s)  p90 (s)  rounds/s  wall (s)  accuracy")
    for poll, row in rows.items():
        print(
            f"{poll:8.3f}  {row['round_median_s']:16.3f}  {row['round_p90_s']:7.3f}  "
            f"{row['rounds_per_s']:8.2f}  {row['wall_s']:8.1f}  {row['accuracy']:8.3f}"
        )
    ratio = rows[0.005]["round_median_s"] / rows[0.1]["round_median_s"]
    print(f"round time, fedaiot's poll / Flower's: x{ratio:.2f}")


if __name__ == "__main__":
    main()
