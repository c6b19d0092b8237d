"""Seconds per deployed round: a real SuperLink and N SuperNodes on 127.0.0.1, TLS and node
authentication, the kits' own commands; plain and secure rounds, the kits' fast paths against
Flower's stock behaviour.

Each configuration is a fresh federation set up as deployment does it (each institution's
``node init``, the coordinator's ``provision --approve``, ``node pin``, every institution's
approval of the app bundle: ``tests/deploy_support.py``), each institution's file of the task's
bundled data, then ``fedaiot coordinator start`` and N times ``fedaiot node start``, as an
operator runs them (``--stock-flower`` for the stock rows). The
round time is the coordinator's (journal ``seconds``: the exchanges, aggregation, evaluation on
the held-out set and the signed registration). Round 1 is left out of the statistics: it
advertises its keys in an exchange of its own and the nodes' runtimes warm up.

    .venv/bin/python simulations/bench_deploy.py [--nodes 3] [--rounds 12] [--stock-rounds 4]
        [--task breast-cancer] [--epsilon 1.0] [--skip-stock] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.launch.processes import free_port, spawn, stop_tree
from fedaiot.launch.signals import interrupt_once
from tests.deploy_support import federation as make_federation

FEDAIOT = [sys.executable, "-m", "fedaiot"]
CEILING = 3600.0  # seconds a configuration may take before it is called failed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# Which part of the federation a process is, by the program it runs (``-m`` module or script).
ROLES = {
    "fedaiot.launch.fast_superlink": "superlink",
    "flower-superlink": "superlink",
    "flower-superexec": "superexec",
    "flwr-serverapp": "serverapp",
    "fedaiot.launch.fast_supernode": "supernode",
    "flower-supernode": "supernode",
    "fedaiot.launch.clientapp_runner": "runner",
    "flwr-clientapp": "runner",
}


def _role(member: psutil.Process) -> str:
    argv = member.cmdline()  # empty for a zombie
    if "-m" in argv[:3] and argv.index("-m") + 1 < len(argv):
        program = argv[argv.index("-m") + 1]
    elif len(argv) > 1:
        program = Path(argv[1]).name
    else:
        return "other"
    if program == "fedaiot":  # the kits, with the flwr commands they run
        return "coordinator kit" if "coordinator" in argv[:5] else "node kit"
    return ROLES.get(program, program)


def _tree_cpu(processes: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds used so far by these processes and everything below them, by role: the live
    ones, and the ones they reaped (a runner's forked children, Flower's ClientApp
    processes, counted in the process that reaped them)."""
    totals: dict[str, float] = {}
    for process in processes:
        try:
            root = psutil.Process(process.pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = member.cpu_times()
                role = _role(member)
                spent = t.user + t.system + t.children_user + t.children_system
                totals[role] = totals.get(role, 0.0) + spent
    return totals


def _rounds_done(journal: Path) -> int:
    if not journal.exists():
        return 0
    return sum('"event": "round"' in line for line in journal.read_text().splitlines())


def federation(
    root: Path, *, nodes: int, rounds: int, task: str, epsilon: float, secure: bool, stock: bool
) -> dict[str, Any]:
    """One run to its end; the coordinator's round times and exchanges, rounds 2 onwards."""
    names = [f"site{i:02d}" for i in range(nodes)]
    fed = make_federation(root, names, bundle=True)
    assert fed.bundle is not None and fed.approvals is not None
    # IID shares: with Dirichlet ones, ten nodes of 569 records leave some a single class,
    # and the kit refuses to start such a node
    cfg = RunConfig(
        task=task, num_rounds=rounds, epsilon=epsilon, output_dir="unused", partitioner="iid"
    )
    files = export(cfg, nodes, root / "data", names)
    run_config = root / "run.toml"
    run_config.write_text(
        f'task = "{task}"\nnum-rounds = {rounds}\nepsilon = {epsilon}\n'
        f"secure-aggregation = {'true' if secure else 'false'}\n"
    )
    port, state = free_port(), root / "state"
    flag = ["--stock-flower"] if stock else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started: list[subprocess.Popen[bytes]] = []
    journal = state / "runs" / task / "journal.jsonl"
    try:
        coordinator_log = root / "coordinator.log"
        coordinator_args = ["coordinator", "start", "--run-config", str(run_config)]
        coordinator_args += ["--bundle", str(fed.bundle), "--approval", str(fed.approvals)]
        coordinator_args += ["--pki", str(fed.pki), "--state", str(state), "--port", str(port)]
        with open(coordinator_log, "ab") as log:
            coordinator = spawn([*FEDAIOT, *coordinator_args, "--json", *flag], env, log)
        started.append(coordinator)
        deadline = time.monotonic() + CEILING
        while "submitted run" not in coordinator_log.read_text():  # every node registered
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start: {coordinator_log}")
            time.sleep(0.2)
        for name, data in zip(names, files, strict=True):
            node_args = ["node", "start", "--task", task, "--data", str(data)]
            node_args += ["--kit", str(fed.kits[name]), "--superlink", f"127.0.0.1:{port}"]
            with open(root / f"node-{name}.log", "ab") as log:
                started.append(
                    spawn([*FEDAIOT, *node_args, "--port", str(free_port()), *flag], env, log)
                )
        # CPU of every process, sampled as each round is journalled: from the end of round 1
        # to the end of the last (start-up and shutdown left out: a SuperLink that ended
        # would count in the kit that reaped it)
        cpu_at: dict[int, dict[str, float]] = {}
        while coordinator.poll() is None and time.monotonic() < deadline:
            for name, node in zip(names, started[1:], strict=True):
                if node.poll() is not None:  # the run would wait for it until the ceiling
                    log_file = root / f"node-{name}.log"
                    raise RuntimeError(f"node {name} stopped ({node.returncode}): {log_file}")
            done = _rounds_done(journal)
            if done and done not in cpu_at:
                cpu_at[done] = _tree_cpu(started)
            time.sleep(0.2)
        code = coordinator.wait(timeout=CEILING)
        if code != 0:
            raise RuntimeError(f"the run failed ({code}): {coordinator_log}")
    finally:
        for process in reversed(started):
            stop_tree(process)
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    played = [e for e in events if e["event"] == "round"]
    by_role: dict[str, float] = {}
    if len(cpu_at) >= 2:
        (first, at_first), (last, at_last) = min(cpu_at.items()), max(cpu_at.items())
        for role in at_last:
            spent = at_last[role] - at_first.get(role, 0.0)
            by_role[role] = round(spent / (last - first), 3)
    later = played[1:] or played
    seconds = [float(e["seconds"]) for e in later]
    return {
        "median_s": statistics.median(seconds),
        "p90_s": _percentile(seconds, 0.9),
        "first_s": float(played[0]["seconds"]),
        "exchanges": statistics.median(e.get("exchanges", 0) for e in later),
        "aggregated": sum(bool(e["aggregated"]) for e in played),
        "rounds": len(played),
        # every process of the federation, rounds 2 onwards: what a loaded machine cannot
        # change (its wall-clock medians depend on what else runs)
        "cpu_s_per_round": sum(by_role.values()) if by_role else math.nan,
        "cpu_s_per_round_by_role": by_role,
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
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's folder here")
    args = parser.parse_args()
    # a stopped benchmark stops its federation too (the finally clauses run)
    interrupt_once(lambda signum: SystemExit(128 + signum))
    plan = [("plain", False, False, args.rounds), ("secure", True, False, args.rounds)]
    if not args.skip_stock:
        plan.append(("stock_secure", True, True, args.stock_rounds))
    results: dict[str, Any] = {"nodes": args.nodes, "rounds": args.rounds, "task": args.task}
    results["load_average_before"] = os.getloadavg()[0]  # a loaded machine: say so
    for name, secure, stock, rounds in plan:
        with tempfile.TemporaryDirectory(prefix=f"bench-deploy-{name}-") as folder:
            where = Path(folder) if args.keep is None else args.keep / name
            where.mkdir(parents=True, exist_ok=True)
            got = federation(
                where,
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
                f"{got['first_s']:.2f} s; {got['aggregated']} aggregated; "
                f"{got['cpu_s_per_round']:.2f} CPU-s a round, all processes)",
                flush=True,
            )
            parts = sorted(got["cpu_s_per_round_by_role"].items(), key=lambda kv: -kv[1])
            print("               CPU-s a round: " + ", ".join(f"{r} {s:.2f}" for r, s in parts))
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        before, after = results["load_average_before"], results["load_average_after"]
        print(f"load average (1 min) {before:.1f} before, {after:.1f} after", flush=True)


if __name__ == "__main__":
    main()
