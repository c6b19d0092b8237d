"""Reference benchmark: Flower's own SecAgg+ against plain FedAvg, both on the legacy API.

Flower 1.41's SecAgg+ works only with the legacy wiring (``LegacyContext`` + ``NumPyClient`` +
``secaggplus_mod``), so both arms use it: a ``ServerApp`` running ``DefaultWorkflow()`` (plain)
or ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares, reconstruction_threshold))``
(secure) with a legacy ``FedAvg`` (full participation, no evaluation), and a ``ClientApp`` built
from a ``NumPyClient`` whose model is one ``float32`` vector of ``P`` parameters; ``fit`` returns
the received vector plus small seeded noise with ``num_examples = 10`` (no training: we measure
the cost of aggregation). Each arm runs in its own subprocess through the in-process
``flwr.simulation.run_simulation`` (Ray backend, one CPU per ClientApp), so Ray starts fresh
every time and its start-up (a fixed cost) stays out of the numbers.

Round time is measured on the server side, from the strategy's ``configure_fit`` to the end of
its ``aggregate_fit``; the median is taken over rounds 2..R (round 1 as well when R = 1). The
``Grid`` handed to the workflow is instrumented: it counts the protobuf size of every message
content sent to / received from each node (what would travel in deployment; the counting time
is subtracted from the round), the time the server spends waiting in ``send_and_receive``
(the rest of the round is server compute), and a thin outer client mod reports each ClientApp
call's compute time. SecAgg+ stages are timed by subclassing ``SecAggPlusWorkflow``.

What travels in Flower's SecAgg+ (``flwr/client/mod/secure_aggregation/secaggplus_mod.py``,
``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``), per node and round, in four
request/reply stages: setup (config -> two public keys), share keys (neighbours' public keys ->
``num_shares - 1`` encrypted share pairs), collect masked vectors (FitIns with the global model
plus forwarded ciphertexts -> the masked vector), unmask (active/dead ID lists -> key shares).
The update is scaled by ``num_examples / max_weight``, clipped to +-8, stochastically quantised
to ``[0, 2^22)`` (``int32``), prefixed with the quantised weight, masked modulo 2^32 with
``int64`` masks, and shipped as ``np.save`` bytes of an ``int64`` array: about ``8 * (P + 1)``
bytes up, twice a plain ``float32`` update. The server's dequantised aggregate is ``float64``, so
from round 2 on the global model (the downlink) is ``float64`` too. Masks come from
``np.random.RandomState`` seeded with a 32-bit fold of the shared secret.

Usage::

    python simulations/bench_flower_secaggplus.py [--nodes 10 20 50] [--params 100000 1000000]
        [--rounds 3] [--timeout 420] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np

DEFAULT_NODES = (10, 20, 50)
DEFAULT_PARAMS = (100_000, 1_000_000)
NUM_EXAMPLES = 10
NOISE_SCALE = 0.01
RESULT_TAG = "BENCH_RESULT "
TIMING_KEY = "bench.timing"
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def secagg_params(n: int) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` for ``n`` nodes.

    SecAgg+ wants a neighbourhood of O(log n) nodes (Flower's example: 3 shares, threshold 2,
    for 5 nodes): the smallest odd number >= max(3, 2*log2 n), capped at n; the threshold is
    about two thirds of it, at least 2 and below ``num_shares``.
    """
    k = max(3, math.ceil(2 * math.log2(max(n, 2))))
    if k % 2 == 0:
        k += 1
    k = min(k, n)
    t = min(max(2, math.ceil(2 * k / 3)), k - 1)
    return k, t


def _noise(seed: int, pid: int, rnd: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, pid, rnd])
    return rng.standard_normal(size, dtype=np.float32) * np.float32(NOISE_SCALE)


def _initial_vector(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, 1_000_003]).normal(0.0, 0.1, size).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Worker: one arm (plain or secure) for one (n, P), inside its own process.
# --------------------------------------------------------------------------------------------


class Probe:
    """What the server side records, per round (all in the driver process)."""

    def __init__(self) -> None:
        self.start: dict[int, float] = {}
        self.end: dict[int, float] = {}
        self.overhead: dict[int, float] = defaultdict(float)  # byte counting, subtracted
        self.wait: dict[int, float] = defaultdict(float)  # inside send_and_receive
        self.down: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.up: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.client_s: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.stage_s: dict[int, dict[str, float]] = defaultdict(dict)
        self.results: dict[int, tuple[int, int]] = {}
        self.final: list[np.ndarray] | None = None


def _instrument_grid(grid: Any, probe: Probe) -> None:
    from flwr.app import Message
    from flwr.common.serde import recorddict_to_proto

    original = grid.send_and_receive

    def send_and_receive(messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        rnd = int(messages[0].metadata.group_id) if messages else 0
        t0 = time.perf_counter()
        for msg in messages:
            size = recorddict_to_proto(msg.content).ByteSize()
            probe.down[rnd][msg.metadata.dst_node_id] += size
        t1 = time.perf_counter()
        replies = list(original(messages, timeout=timeout))
        t2 = time.perf_counter()
        for msg in replies:
            if not msg.has_content():
                continue
            src = msg.metadata.src_node_id
            timing = msg.content.metric_records.pop(TIMING_KEY, None)
            if timing is not None:
                probe.client_s[rnd][src] += float(timing["s"])
            probe.up[rnd][src] += recorddict_to_proto(msg.content).ByteSize()
        t3 = time.perf_counter()
        probe.overhead[rnd] += (t1 - t0) + (t3 - t2)
        probe.wait[rnd] += t2 - t1
        return replies

    grid.send_and_receive = send_and_receive


def run_arm(mode: str, n: int, size: int, rounds: int, k: int, t: int, seed: int) -> dict:
    """Run one simulation and return its raw per-round measurements."""
    from flwr.app import Context, Message, MetricRecord
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.simulation import run_simulation

    probe = Probe()
    init = _initial_vector(seed, size)

    class BenchClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def get_parameters(self, config: dict) -> list[np.ndarray]:
            return [np.zeros(size, dtype=np.float32)]

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple:
            noise = _noise(seed, self.pid, int(config["round"]), size)
            return [parameters[0] + noise], NUM_EXAMPLES, {}

    def client_fn(context: Context) -> Any:
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    def timing_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        t0 = time.perf_counter()
        out = call_next(msg, ctx)
        if out.has_content():
            out.content.metric_records[TIMING_KEY] = MetricRecord({"s": time.perf_counter() - t0})
        return out

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            probe.start[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            probe.end[server_round] = time.perf_counter()
            probe.results[server_round] = (len(results), len(failures))
            if server_round == rounds and out[0] is not None:
                probe.final = parameters_to_ndarrays(out[0])
            return out

    def _timed(name: str, stage: Any, grid: Any, context: Any, state: Any) -> bool:
        t0 = time.perf_counter()
        ok = stage(grid, context, state)
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        rnd = int(cfg[WorkflowKey.CURRENT_ROUND])
        probe.stage_s[rnd][name] = time.perf_counter() - t0
        return ok

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
            return _timed("setup", super().setup_stage, grid, context, state)

        def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
            return _timed("share_keys", super().share_keys_stage, grid, context, state)

        def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
            stage = super().collect_masked_vectors_stage
            return _timed("collect_masked_vectors", stage, grid, context, state)

        def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
            return _timed("unmask", super().unmask_stage, grid, context, state)

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([init]),
        on_fit_config_fn=lambda rnd: {"round": rnd},
    )
    if mode == "secure":
        workflow = DefaultWorkflow(
            fit_workflow=TimedSecAggPlus(num_shares=k, reconstruction_threshold=t)
        )
        mods = [timing_mod, secaggplus_mod]
    else:
        workflow = DefaultWorkflow()
        mods = [timing_mod]

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Context) -> None:
        _instrument_grid(grid, probe)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow(grid, legacy)

    client_app = ClientApp(client_fn=client_fn, mods=mods)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    total = time.perf_counter() - t0

    # Correctness, outside the timed rounds: FedAvg of identical weights is the plain mean.
    max_err = None
    final_dtype = None
    if probe.final is not None:
        want = init.astype(np.float64)
        for rnd in range(1, rounds + 1):
            want += sum(_noise(seed, pid, rnd, size).astype(np.float64) for pid in range(n)) / n
        final_dtype = str(probe.final[0].dtype)
        max_err = float(np.max(np.abs(probe.final[0].astype(np.float64) - want)))

    done = sorted(r for r in probe.end if r in probe.start)
    return {
        "mode": mode,
        "n": n,
        "P": size,
        "rounds": rounds,
        "rounds_completed": len(done),
        "num_shares": k if mode == "secure" else None,
        "threshold": t if mode == "secure" else None,
        "round_s": [probe.end[r] - probe.start[r] - probe.overhead[r] for r in done],
        "wait_s": [probe.wait[r] for r in done],
        "client_s_per_node": [
            statistics.mean(probe.client_s[r].values()) if probe.client_s[r] else None for r in done
        ],
        "down_bytes_per_node": [statistics.mean(probe.down[r].values()) for r in done],
        "up_bytes_per_node": [statistics.mean(probe.up[r].values()) for r in done],
        "stage_s": [probe.stage_s.get(r, {}) for r in done],
        "results_failures": [probe.results[r] for r in done],
        "final_dtype": final_dtype,
        "max_abs_err": max_err,
        "simulation_wall_s": total,
    }


# --------------------------------------------------------------------------------------------
# Parent: one subprocess per arm, then the table.
# --------------------------------------------------------------------------------------------


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _estimated_peak_bytes(n: int, size: int) -> int:
    # Link state + server copies: per node a float64 FitIns, an int64 masked vector and its
    # decoded copy (~24 B/param/node); two Ray actors and Ray itself: about 2 GB.
    return 24 * n * size + 2 * 1024**3


def _run_subprocess(args: argparse.Namespace, mode: str, n: int, size: int) -> dict:
    k, t = args.num_shares or secagg_params(n)[0], args.threshold or secagg_params(n)[1]
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--nodes",
        str(n),
        "--params",
        str(size),
        "--rounds",
        str(args.rounds),
        "--num-shares",
        str(k),
        "--threshold",
        str(t),
        "--seed",
        str(args.seed),
    ]
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout
        return {
            "mode": mode,
            "n": n,
            "P": size,
            "error": f"timed out after {args.timeout:.0f} s",
            "log_tail": (out or "")[-2000:],
        }
    wall = time.perf_counter() - started
    text = proc.stdout + proc.stderr
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, f"{mode}_n{n}_p{size}.log"), "w") as fh:
            fh.write(text)
    result: dict | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    notes = {
        "exit_code": proc.returncode,
        "process_wall_s": wall,
        "deprecated_lines": len(re.findall(r"DEPRECATED", text)),
        "error_lines": len(re.findall(r"\bERROR\b", text)),
        "halted": "Secure aggregation halted" in text,
    }
    if result is None:
        return {
            "mode": mode,
            "n": n,
            "P": size,
            "error": f"worker exited {proc.returncode} without a result",
            "log_tail": text[-2000:],
            **notes,
        }
    result.update(notes)
    if result["rounds_completed"] < args.rounds:
        result["error"] = f"only {result['rounds_completed']}/{args.rounds} rounds completed"
    bad = [rf for rf in result["results_failures"] if rf[0] != n or rf[1] != 0]
    if bad:
        result["error"] = f"results/failures per round {result['results_failures']}"
    return result


def _summary(arm: dict | None) -> dict:
    if arm is None or "error" in arm or not arm.get("round_s"):
        return {}
    skip = 1 if len(arm["round_s"]) > 1 else 0

    def med(key: str) -> float | None:
        vals = [v for v in arm[key][skip:] if v is not None]
        return statistics.median(vals) if vals else None

    stages = {}
    for name in STAGES:
        vals = [s[name] for s in arm["stage_s"][skip:] if name in s]
        if vals:
            stages[name] = statistics.median(vals)
    round_s = med("round_s")
    wait_s = med("wait_s")
    return {
        "round_s": round_s,
        "server_compute_s": None if round_s is None or wait_s is None else round_s - wait_s,
        "client_s_per_node": med("client_s_per_node"),
        "down_bytes_per_node": med("down_bytes_per_node"),
        "up_bytes_per_node": med("up_bytes_per_node"),
        "stage_s": stages,
        "max_abs_err": arm.get("max_abs_err"),
        "final_dtype": arm.get("final_dtype"),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(rows: list[dict]) -> None:
    head = (
        f"{'n':>3} {'P':>9} {'k':>3} {'t':>3} {'plain s':>8} {'SA+ s':>8} {'ratio':>6} "
        f"{'plain up B':>12} {'SA+ up B':>12} {'SA+ down B':>12} {'plain err':>9} "
        f"{'SA+ err':>9}  note"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        plain, secure = row["plain"], row["secure"]
        ratio = (
            secure["round_s"] / plain["round_s"]
            if plain.get("round_s") and secure.get("round_s")
            else None
        )
        print(
            f"{row['n']:>3} {row['P']:>9} {row['num_shares']:>3} {row['threshold']:>3} "
            f"{_fmt(plain.get('round_s'), '8.3f')} {_fmt(secure.get('round_s'), '8.3f')} "
            f"{_fmt(ratio, '6.2f')} {_fmt(plain.get('up_bytes_per_node'), '12,.0f')} "
            f"{_fmt(secure.get('up_bytes_per_node'), '12,.0f')} "
            f"{_fmt(secure.get('down_bytes_per_node'), '12,.0f')} "
            f"{_fmt(plain.get('max_abs_err'), '9.1e')} {_fmt(secure.get('max_abs_err'), '9.1e')}"
            f"  {row['note']}"
        )
    print()
    print("Breakdown (medians over the timed rounds; client s = compute per node per round):")
    head = (
        f"{'n':>3} {'P':>9} {'arm':>6} {'round s':>8} {'server s':>9} {'client s':>9} "
        f"{'down B/node':>12}  SecAgg+ stages s (setup/share/collect/unmask)"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        for arm in ("plain", "secure"):
            s = row[arm]
            if not s:
                continue
            stages = "/".join(f"{s['stage_s'][k]:.3f}" for k in STAGES if k in s["stage_s"])
            print(
                f"{row['n']:>3} {row['P']:>9} {arm:>6} {_fmt(s.get('round_s'), '8.3f')} "
                f"{_fmt(s.get('server_compute_s'), '9.3f')} "
                f"{_fmt(s.get('client_s_per_node'), '9.3f')} "
                f"{_fmt(s.get('down_bytes_per_node'), '12,.0f')}  {stages}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES))
    parser.add_argument("--params", type=int, nargs="+", default=list(DEFAULT_PARAMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per arm")
    parser.add_argument("--num-shares", type=int, default=None, help="override num_shares")
    parser.add_argument("--threshold", type=int, default=None, help="override threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default=None, help="keep each arm's full log here")
    parser.add_argument("--worker", choices=("plain", "secure"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    if args.worker:
        n, size = args.nodes[0], args.params[0]
        res = run_arm(args.worker, n, size, args.rounds, args.num_shares, args.threshold, args.seed)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    mem = _mem_available_bytes()
    rows = []
    for n in args.nodes:
        k, t = secagg_params(n)
        k, t = args.num_shares or k, args.threshold or t
        for size in args.params:
            row: dict[str, Any] = {"n": n, "P": size, "num_shares": k, "threshold": t}
            need = _estimated_peak_bytes(n, size)
            if mem is not None and need > 0.6 * mem:
                row.update(
                    plain={},
                    secure={},
                    raw={},
                    note=f"skipped: needs ~{need / 1024**3:.1f} GB, "
                    f"{mem / 1024**3:.1f} GB available",
                )
                rows.append(row)
                continue
            if not args.json:
                print(f"# n={n} P={size}: num_shares={k} threshold={t} ...", flush=True)
            raw = {mode: _run_subprocess(args, mode, n, size) for mode in ("plain", "secure")}
            errors = [f"{m}: {raw[m]['error']}" for m in raw if "error" in raw[m]]
            note = "; ".join(errors) if errors else "ok"
            if not errors and args.rounds == 1:
                note = "ok (R=1: round 1 includes warm-up)"
            row.update(
                plain=_summary(raw["plain"]), secure=_summary(raw["secure"]), raw=raw, note=note
            )
            rows.append(row)
            if not args.json:
                print(
                    f"#   plain {raw['plain'].get('process_wall_s', 0):.0f} s, secure "
                    f"{raw['secure'].get('process_wall_s', 0):.0f} s of process wall; {note}",
                    flush=True,
                )

    if args.json:
        print(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    else:
        print()
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
