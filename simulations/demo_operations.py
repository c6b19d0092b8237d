"""A model's life, on real processes: campaign -> gate -> serve -> alert, with its plots.

    .venv/bin/python simulations/demo_operations.py --task breast-cancer --out runs/ops-bc
    .venv/bin/python simulations/demo_operations.py --task basic-motions --nodes 3 --rounds 10 \
        --set dp-mode=off --min-agreement 0.3 --out runs/ops-motions

Simulated institutions keep their own files (``node-<i>/data.*``); each campaign is a
``fedaiot coordinator campaign`` process, the model is served by ``fedaiot serve`` with alert
rules, and a little HTTP server stands in for the operators' webhook. The story:

1. campaign 1 trains briefly (``--first-rounds``) on 40 % of each node's records and is
   served;
2. every node gets 30 % more records; campaign 2 continues from the served model, is shadowed
   on live requests and the gate decides;
3. the same nodes then get records whose labels were recorded wrong (shifted by one class);
   campaign 3 is shadowed and the gate decides;
4. a drifted input stream (every feature 3 standard deviations up) fires the drift alert.

Writes ``accuracy.png`` (accuracy per version, with the gate's decisions), ``drift.png``
(the served version's largest PSI over time, the threshold and when the alert fired) and
``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import raw_partitions, write_institution_file
from fedaiot.registry.signing import generate_keypair, load_private_key
from fedaiot.serving.auth import issue_token
from fedaiot.tasks import ArrayData, get_task

RULES = """
interval_seconds: 0.5
webhook: {{url: "{hook}", timeout_seconds: 5}}
rules:
  - {{name: gate, kind: promotion_gate, margin: {margin}, min_agreement: {agreement},
     min_shadow_rows: 100}}
  - {{name: input-drift, kind: drift, threshold: {drift}, window_seconds: 20, for_seconds: 5,
     min_rows: 100, severity: critical}}
  - {{name: accuracy-drop, kind: accuracy_drop, max_drop: 0.05, rollback: true}}
"""
LIMITS = {"clinician": {"per_second": 1000, "burst": 1000, "rows_per_day": 10**7,
                        "rows_per_second": 10**5, "rows_burst": 10**5}}  # fmt: skip


def write_nodes(task: str, nodes: int, folder: Path, stage: int) -> None:
    cfg = RunConfig(task=task, partitioner="iid")
    classes = get_task(task).num_classes
    for index, part in enumerate(raw_partitions(cfg, nodes)):
        first, second = int(len(part) * 0.4), int(len(part) * 0.7)
        x, y = part.x[: second if stage >= 2 else first], part.y[: second if stage >= 2 else first]
        if stage >= 3:  # a coding error at the sites: every new label one class off
            x, y = (
                np.concatenate([x, part.x[second:]]),
                np.concatenate([y, (part.y[second:] + 1) % classes]),
            )
        write_institution_file(cfg, ArrayData(x, y), folder / f"node-{index}" / "data")


class Hook:
    """The operators' webhook: every alert POSTed to it, with the time it arrived."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                bodies.append({**body, "received": time.time()})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.private, self.public = generate_keypair(self.out / "keys", force=True)
        self.key = load_private_key(self.private)
        self.env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
        self.log: list[dict[str, Any]] = []

    def token(self, role: str) -> dict[str, str]:
        value = issue_token(self.key, subject=f"demo-{role}", role=role, ttl_seconds=3600)
        return {"Authorization": f"Bearer {value}"}

    def campaign(self, *extra: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "fedaiot", "coordinator", "campaign", "--json"]
        command += ["--registry", str(self.out / "registry"), "--signing-key", str(self.private)]
        command += ["--engine", self.args.engine, *extra]
        done = subprocess.run(command, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise SystemExit(f"campaign failed: {done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{result['version']}: accuracy {result['accuracy']:.4f}", flush=True)
        return result

    def serve(self, hook: Hook) -> subprocess.Popen[str]:
        rules = self.out / "alerts.yml"
        rules.write_text(
            RULES.format(
                hook=hook.url,
                margin=self.args.margin,
                drift=self.args.drift,
                agreement=self.args.min_agreement,
            )
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**self.env, "FEDAIOT_SERVE_RATE_LIMITS": json.dumps(LIMITS)}
        command = [
            sys.executable,
            "-m",
            "fedaiot",
            "serve",
            "--registry",
            str(self.out / "registry"),
        ]
        command += ["--public-key", str(self.public), "--alert-rules", str(rules)]
        command += ["--port", str(port), "--log-level", "warning"]
        process = subprocess.Popen(command, env=env, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return process
            except httpx.TransportError:
                time.sleep(0.2)
        raise SystemExit("fedaiot serve did not start")

    def acceptable(self, rows: np.ndarray, version: str) -> np.ndarray:
        """Rows the service takes even 3 standard deviations up: it refuses values more than
        100 from the training mean (power spikes of a few ACSF1 series are)."""
        from fedaiot.registry.store import ModelRegistry

        schema = ModelRegistry(self.out / "registry").manifest(version).input_schema
        norm = schema.get("normalization") or {}
        if not norm:
            return np.ones(len(rows), dtype=bool)
        view = (1, -1) + (1,) * (rows.ndim - 2)
        mean = np.asarray(norm["mean"]).reshape(view)
        std = np.asarray(norm["std"]).reshape(view)
        far = np.abs(rows - mean) > 90 * std
        return ~far.reshape(len(rows), -1).any(axis=1)

    def served(self) -> str:
        return str(httpx.get(f"{self.url}/healthz", timeout=30).json()["model_version"])

    def predict(self, rows: np.ndarray) -> None:
        flat = rows.reshape(len(rows), -1)  # the service takes a series flattened
        for start in range(0, len(rows), 50):
            answer = httpx.post(
                f"{self.url}/v1/predict",
                json={"instances": flat[start : start + 50].tolist()},
                headers=self.token("clinician"),
                timeout=60,
            )
            answer.raise_for_status()

    def shadow_and_decide(self, version: str, traffic: np.ndarray) -> dict[str, Any]:
        admin, auditor = self.token("admin"), self.token("auditor")
        httpx.post(f"{self.url}/v1/models/{version}/shadow", headers=admin).raise_for_status()
        deadline, sent = time.monotonic() + 600, 0
        while time.monotonic() < deadline:
            report = httpx.get(f"{self.url}/v1/models/{version}/shadow", headers=auditor).json()
            if report.get("decision"):
                return dict(report["decision"])
            self.predict(np.take(traffic, range(sent, sent + 50), axis=0, mode="wrap"))
            sent += 50
            time.sleep(0.5)
        raise SystemExit(f"the gate never decided on {version}")

    def drift_timeline(self, traffic: np.ndarray, shift: np.ndarray, hook: Hook) -> dict[str, Any]:
        """Normal traffic, then drifted traffic; the largest PSI every second, until the
        webhook has the drift alert (or 120 s of drifted traffic)."""
        auditor, start, points = self.token("auditor"), time.time(), []
        drift_from, fired = None, None
        while time.time() - start < 200:
            drifted = time.time() - start >= 30
            if drifted and drift_from is None:
                drift_from = time.time() - start
            batch = np.take(
                traffic, range(20 * len(points), 20 * len(points) + 20), axis=0, mode="wrap"
            )
            self.predict(batch + (shift if drifted else 0.0))  # fresh rows: repeats would drift
            view = httpx.get(f"{self.url}/v1/monitoring", params={"window_seconds": 20},
                             headers=auditor).json()  # fmt: skip
            served = self.served()
            psi = [v.get("psi_max") for v in view["versions"] if v["version"] == served]
            points.append((time.time() - start, psi[0] if psi else None))
            posted = [b for b in hook.bodies if b.get("rule") == "input-drift"]
            if posted and fired is None:
                fired = posted[0]["received"] - start
            if fired is not None and time.time() - start > fired + 5:
                break
            time.sleep(1.0)
        return {"points": points, "drift_from": drift_from, "alert_at": fired}


def plots(out: Path, versions: list[dict[str, Any]], drift: dict[str, Any], limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [v["version"].split("-r")[0].rsplit("-", 1)[-1] for v in versions]
    bars = ax.bar(names, [v["accuracy"] for v in versions], color=["#4477aa", "#228833", "#cc3311"])
    for bar, v in zip(bars, versions, strict=True):
        ax.annotate(f"{v['accuracy']:.3f}\n{v['gate']}", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy (coordinator's evaluation)")
    ax.set_title("accuracy per campaign version")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [p[0] for p in drift["points"] if p[1] is not None]
    ax.plot(t, [p[1] for p in drift["points"] if p[1] is not None], label="largest PSI (20 s)")
    ax.axhline(limit, color="gray", linestyle="--", label="alert threshold")
    if drift["drift_from"] is not None:
        ax.axvline(drift["drift_from"], color="orange", label="drifted inputs start")
    if drift["alert_at"] is not None:
        ax.axvline(drift["alert_at"], color="red", label="webhook received the alert")
    ax.set_xlabel("seconds")
    ax.set_ylabel("PSI")
    ax.set_title("input drift of the served version")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="breast-cancer")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of campaigns 2 and 3")
    parser.add_argument("--first-rounds", type=int, default=1, help="campaign 1: a quick start")
    parser.add_argument("--margin", type=float, default=-0.05, help="the gate's margin")
    parser.add_argument("--min-agreement", type=float, default=0.5, help="the gate's")
    parser.add_argument("--drift", type=float, default=1.0, help="the drift rule's PSI")
    parser.add_argument("--secagg-dropout", type=float, default=0.1)
    parser.add_argument("--set", action="append", help="a run-config key=value for campaign 1")
    parser.add_argument("--engine", default="inprocess", choices=["inprocess", "flower"])
    parser.add_argument("--out", default="runs/ops-demo")
    args = parser.parse_args()
    demo, hook = Demo(args), Hook()
    nodes = demo.out / "nodes"
    write_nodes(args.task, args.nodes, nodes, 1)
    common = ["--rounds", str(args.rounds)]
    first = ["--base", "fresh", "--task", args.task, "--node-data", str(nodes)]
    first += ["--epsilon", str(args.epsilon), "--rounds", str(args.first_rounds)]
    first += ["--set", "partitioner=iid", "--set", f"secagg-dropout={args.secagg_dropout}"]
    for item in args.set or []:  # campaign 1's settings; the later campaigns inherit them
        first += ["--set", item]
    one = demo.campaign(*first)
    server = demo.serve(hook)
    try:
        cfg = RunConfig(task=args.task, partitioner="iid")
        pool = np.concatenate([p.x for p in raw_partitions(cfg, args.nodes)])
        traffic = pool[np.random.default_rng(1).permutation(len(pool))]
        traffic = traffic[demo.acceptable(traffic, one["version"])]
        axes = (0, *range(2, pool.ndim))  # per feature, or per channel of a series
        shift = 3.0 * pool.std(axis=axes, keepdims=True)[0]
        write_nodes(args.task, args.nodes, nodes, 2)
        two = demo.campaign(*common)
        two["gate"] = demo.shadow_and_decide(two["version"], traffic)["outcome"]
        write_nodes(args.task, args.nodes, nodes, 3)
        three = demo.campaign(*common)
        three["gate"] = demo.shadow_and_decide(three["version"], traffic)["outcome"]
        one["gate"] = "served first"
        drift = demo.drift_timeline(traffic, shift, hook)
        served = demo.served()
    finally:
        server.terminate()
        server.wait(30)
    versions = [one, two, three]
    plots(demo.out, versions, drift, args.drift)
    results = {
        "task": args.task, "nodes": args.nodes, "epsilon": args.epsilon, "rounds": args.rounds,
        "versions": [{k: v[k] for k in ("version", "base", "accuracy", "gate")} | {"nodes": [
            {k: n[k] for k in ("node", "trained", "refused", "cohorts")} for n in v["nodes"]]}
            for v in versions],
        "served_at_end": served, "drift": drift,
        "webhook": [{k: b.get(k) for k in ("rule", "state", "subject", "severity", "message")}
                    for b in hook.bodies],
    }  # fmt: skip
    (demo.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: results[k] for k in ("served_at_end",)} | {
        "accuracy": {v["version"]: round(v["accuracy"], 4) for v in versions},
        "gate": {v["version"]: v["gate"] for v in versions},
        "drift_from_s": drift["drift_from"], "alert_at_s": drift["alert_at"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
