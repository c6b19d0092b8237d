"""CPU of waiting processes: a real SuperLink (TLS, node authentication, the institutions
registered, no run) and N institutions' ``fedaiot node start``, idle; the CPU time each tree
uses over ``--seconds`` (psutil ``cpu_times``), as a share of one core.

A node's tree is the kit, its SuperNode and (fast kit) its ClientApp runner; the SuperLink's
is the SuperLink and its SuperExec. ``--stock-flower`` measures Flower's own waits instead.

    .venv/bin/python simulations/idle_deploy.py [--nodes 3] [--seconds 30] [--poll-interval S]
        [--stock-flower] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedaiot.config.run import RunConfig
from fedaiot.deploy import provision, superlink
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.superlink import CoordinatorPaths
from fedaiot.launch.processes import free_port, spawn, stop_tree
from fedaiot.launch.signals import interrupt_once
from fedaiot.launch.superlink import start_superlink
from tests.deploy_support import federation

FEDAIOT = [sys.executable, "-m", "fedaiot"]
CEILING = 600.0  # seconds the nodes may take to connect
ROLES = (
    "fast_supernode",
    "clientapp_runner",
    "flower-supernode",
    "superexec",
    "fast_superlink",
    "flower-superlink",
)


def _cpu(process: psutil.Process) -> dict[str, float]:
    """CPU seconds of a process and of each process below it (live ones), by their role."""
    parts: dict[str, float] = {}
    for member in [process, *process.children(recursive=True)]:
        try:
            times, command = member.cpu_times(), " ".join(member.cmdline())
        except psutil.NoSuchProcess:
            continue
        role = next((r for r in ROLES if r in command), "kit")
        parts[role] = parts.get(role, 0.0) + times.user + times.system
    return parts


def measure(root: Path, *, nodes: int, seconds: float, flags: list[str]) -> dict[str, Any]:
    names = [f"site{i:02d}" for i in range(nodes)]
    fed = federation(root, names)
    files = export(RunConfig(task="breast-cancer", output_dir="unused"), nodes, root / "d", names)
    paths = CoordinatorPaths(fed.pki.resolve(), (root / "state").resolve())
    paths.state.mkdir(parents=True)
    port = free_port()
    started = []
    with open(paths.log, "ab") as log:
        link = start_superlink(paths.superlink("127.0.0.1", port), paths.env(), log)
    started.append(link)
    try:
        superlink.write_connection(paths, "127.0.0.1", port)
        superlink.register_nodes(paths, provision.registered_keys(paths.pki))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, data in zip(names, files, strict=True):
            args = ["node", "start", "--task", "breast-cancer", "--data", str(data)]
            args += ["--kit", str(fed.kits[name]), "--superlink", f"127.0.0.1:{port}"]
            with open(root / f"node-{name}.log", "ab") as log:
                started.append(
                    spawn([*FEDAIOT, *args, "--port", str(free_port()), *flags], env, log)
                )
        deadline = time.monotonic() + CEILING
        # connected (the SuperLink activated every node) and, in the kit, every runner ready
        logs = [
            data.parent / ".fedaiot" / f"supernode-{name}.log"
            for name, data in zip(names, files, strict=True)
        ]
        ready = "" if "--stock-flower" in flags else "ClientApp runner ready"

        def waiting() -> bool:
            if paths.log.read_text().count("Activated node_id") < nodes:
                return True
            return not all(log.exists() and ready in log.read_text() for log in logs)

        while waiting():
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError(f"the nodes did not connect: {root}")
            time.sleep(0.5)
        time.sleep(5)  # past the start-up work
        trees = [psutil.Process(p.pid) for p in started]
        before = [_cpu(t) for t in trees]
        time.sleep(seconds)
        after = [_cpu(t) for t in trees]
    finally:
        for process in reversed(started):
            stop_tree(process)
    used = [sum(a.values()) - sum(b.values()) for a, b in zip(after, before, strict=True)]
    roles = {
        role: (after[1].get(role, 0.0) - before[1].get(role, 0.0)) / seconds for role in after[1]
    }
    share = [u / seconds for u in used]
    return {
        "seconds": seconds,
        "superlink_core_share": share[0],
        "node_core_share": share[1:],
        "node_core_share_max": max(share[1:]),
        "first_node_by_process": roles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--poll-interval", type=float, default=None)
    parser.add_argument("--stock-flower", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    interrupt_once(lambda signum: SystemExit(128 + signum))
    flags = ["--stock-flower"] if args.stock_flower else []
    if args.poll_interval is not None:
        flags += ["--poll-interval", str(args.poll_interval)]
    with tempfile.TemporaryDirectory(prefix="idle-deploy-") as folder:
        got = measure(Path(folder), nodes=args.nodes, seconds=args.seconds, flags=flags)
    got["load_average"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(got))
        return
    nodes = ", ".join(f"{100 * s:.1f} %" for s in got["node_core_share"])
    print(
        f"idle over {args.seconds:g} s: each node {nodes} of a core; SuperLink "
        f"{100 * got['superlink_core_share']:.1f} % (load average {got['load_average']:.1f})"
    )
    parts = ", ".join(f"{k} {100 * v:.1f} %" for k, v in got["first_node_by_process"].items())
    print(f"the first node, by process: {parts}")


if __name__ == "__main__":
    main()
