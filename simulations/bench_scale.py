"""How many virtual nodes one machine simulates: time per round and memory as the population grows.

For each population it runs the real Flower simulation (``fedaiot.simulation.engine.simulate``, the
same SuperLink, ServerApp and ClientApp as ``flwr run .``) with a fixed number of nodes sampled
per round (``fraction-train = sampled / population``), DP-SGD on and secure aggregation on
unless ``--secure-aggregation off``. Per population it reports:

- start-up: from the call until the coordinator's first round starts (SuperLink, Ray, node
  registration, the ServerApp's own data split);
- round 1 and the median of rounds 2+ (round 1 also pays for the Ray actors to warm up), and of
  those the secure "train" stage (local DP-SGD) against the rest (key agreement, masking);
- peak memory of the whole process tree below this script (SuperLink, flwr-simulation, Ray's
  services and workers), sampled every ``--sample-every`` s: PSS, which splits shared pages
  (torch's libraries, Ray's object store) between the processes that map them, and the sum of
  RSS, which counts them once per process and so overstates;
- CPU seconds the tree spent, and the share of it in the flwr-simulation process, whose
  dispatcher asks the link state for every node's messages ten times a second;
- records per node (IID partitions of the task's training pool).

    python simulations/bench_scale.py                                # 10, 100, 1000 nodes
    python simulations/bench_scale.py --populations 1000 3000 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_partition
from fedaiot.simulation.engine import simulate
from fedaiot.tasks import get_task
from fedaiot.tasks.partition import plan_partitions


class TreeSampler:
    """Peak memory and CPU time of every process below this one, sampled in a thread."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.peak_pss = 0
        self.peak_rss = 0
        self.peak_processes = 0
        # A process's CPU time only grows, so its last sample is its total; keyed by pid
        # because Ray names many workers alike.
        self.cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            pss = rss = 0
            tree = me.children(recursive=True)
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    memory = process.memory_full_info()
                    times = process.cpu_times()
                    pss += memory.pss
                    rss += memory.rss
                    label = self.cpu[process.pid][0] if process.pid in self.cpu else _label(process)
                    self.cpu[process.pid] = (label, times.user + times.system)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, len(tree))
            self._stop.wait(self.every)

    def cpu_by_label(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for label, seconds in self.cpu.values():
            totals[label] += seconds
        return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _label(process: psutil.Process) -> str:
    """A short name: Ray workers and Flower's console scripts all run as "python"."""
    try:
        words = process.cmdline()
    except psutil.Error:
        return "?"
    if words and words[0].startswith("ray::"):  # an actor's process title
        return words[0]
    if any(word.endswith("default_worker.py") for word in words):  # before it takes its title
        return "ray-worker"
    for word in words:
        base = Path(word).name
        if base.startswith(("flower-", "flwr-", "ray::", "raylet", "gcs_server")) or base in (
            "flwr",
        ):
            return base
    return Path(words[0]).name if words else process.name()


def run_population(
    population: int, args: argparse.Namespace, folder: Path, progress: Progress
) -> dict[str, Any]:
    sampled = min(args.sampled, population)
    cfg = RunConfig(
        task=args.task,
        num_rounds=args.rounds,
        partitioner="iid",
        private=not args.no_dp,
        fraction_train=sampled / population,
        min_train_nodes=sampled,
        min_available_nodes=population,
        secure_aggregation=args.secure_aggregation == "on",
        output_dir=str(folder / f"pop{population}-{args.secure_aggregation}"),
    )
    # Only the index plan: materializing every partition here would hold the data set twice.
    plan = plan_partitions(get_task(cfg.task), population, "iid", seed=cfg.seed)
    records = sorted(len(index) for index in plan.partitions)
    bar = progress.add_task(f"{population:,} nodes: starting", total=args.rounds)
    marks: dict[str, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "start":
            marks["start"] = time.perf_counter() - began
            progress.update(bar, description=f"{population:,} nodes: rounds")
        elif event["event"] == "round":
            progress.advance(bar)

    with TreeSampler(args.sample_every) as sampler:
        began = time.perf_counter()
        outcome = simulate(cfg, population, on_event=on_event, node_cpus=args.node_cpus)
    progress.update(bar, description=f"{population:,} nodes: {outcome.status}")
    row: dict[str, Any] = {
        "population": population,
        "sampled": sampled,
        "status": outcome.status,
        "error": outcome.error,
        "wall_s": outcome.wall_seconds,
        "startup_s": marks.get("start"),
        "records_per_node": records[len(records) // 2],
        "bytes_per_node": records[len(records) // 2] * _record_bytes(cfg),
        "peak_pss_gb": sampler.peak_pss / 1e9,
        "peak_rss_sum_gb": sampler.peak_rss / 1e9,
        "peak_processes": sampler.peak_processes,
        "cpu_s": sampler.cpu_by_label(),
    }
    rounds = [e for e in _journal(cfg) if e["event"] == "round"]
    if rounds:
        row["round1_s"] = rounds[0]["seconds"]
        later = rounds[1:] or rounds
        row["round_s"] = statistics.median(e["seconds"] for e in later)
        trains = [e["stage_seconds"]["train"] for e in later if "stage_seconds" in e]
        row["train_stage_s"] = statistics.median(trains) if trains else None
        row["trained"] = sum(r["status"] == "trained" for e in rounds for r in e["replies"])
    return row


def _record_bytes(cfg: RunConfig) -> int:
    data = simulated_partition(cfg, 0, 1)
    return int(data.x[0].nbytes + data.y[0].nbytes)


def _journal(cfg: RunConfig) -> list[dict[str, Any]]:
    path = cfg.output_path / "journal.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, console: Console) -> None:
    title = (
        f"scale: {args.task}, DP {'off' if args.no_dp else 'on'}, secure aggregation "
        f"{args.secure_aggregation}, {args.rounds} rounds (median of rounds 2+)"
    )
    table = Table(title=title)
    columns = ("population", "sampled", "records/node", "startup s", "round 1 s",
               "median s/round", "of it train s", "peak PSS GB", "peak RSS-sum GB",
               "processes", "CPU s (sim. driver)", "status")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        cpu = row["cpu_s"]
        driver = sum(v for k, v in cpu.items() if k.startswith("flwr-simulation"))
        table.add_row(
            f"{row['population']:,}", str(row["sampled"]), str(row["records_per_node"]),
            _fmt(row["startup_s"], ".1f"), _fmt(row.get("round1_s")), _fmt(row.get("round_s")),
            _fmt(row.get("train_stage_s")), _fmt(row["peak_pss_gb"]),
            _fmt(row["peak_rss_sum_gb"]), str(row["peak_processes"]),
            f"{sum(cpu.values()):.0f} ({driver:.0f})", row["status"],
        )  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10, help="nodes sampled per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--task",
        default="fashion-mnist",
        help="fashion-mnist (60k training images: 60 per node at 1,000 nodes) by default",
    )
    parser.add_argument("--secure-aggregation", choices=["on", "off"], default="on")
    parser.add_argument("--no-dp", action="store_true", help="plain SGD instead of DP-SGD")
    parser.add_argument("--node-cpus", type=int, default=1, help="CPUs per Ray actor")
    parser.add_argument("--sample-every", type=float, default=0.5, help="memory sampling, s")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    console = Console(stderr=True)
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total} rounds"), TimeElapsedColumn())  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="fedaiot-scale-") as tmp,
        Progress(*columns, console=console) as progress,
    ):
        for population in args.populations:
            rows.append(run_population(population, args, Path(tmp), progress))
    # With --json the table goes to stderr, so that stdout holds only the rows.
    print_table(rows, args, Console(width=220, stderr=args.json))
    for row in rows:
        if row["error"]:
            console.print(f"{row['population']:,} nodes: {row['error']}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
