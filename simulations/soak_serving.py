"""Soak: normal callers' latency alone, then while a hostile client sends oversized and slow
requests. Loopback only; every loop bounded in time and count.

Starts ``fedaiot serve`` (defaults, except that the clinicians' daily row quota is lifted)
with a signed breast-cancer model. Normal callers: ``--callers`` threads, each with its
own keep-alive connection and clinician token, sending 1-row predictions at ``--rate`` requests
a second. Three phases of ``--seconds`` each, in one run:

1. **alone**: only the normal callers;
2. **hostile**: the same, while another process (its own interpreter) runs, without a token,
   ``--uploaders`` clients posting 6 MB bodies of 100,000 rows in a loop (issue 11's attack),
   one client posting the same body *with* a valid token, ``--slow`` connections sending their
   headers a byte a second (slowloris), and ``--slow`` authenticated requests whose body stalls
   after 100 bytes (all from one address, as one attacker);
3. **alone again**, after the hostile process has exited.

It prints the normal callers' p50/p99 and error rate in each phase, the ratio of the hostile
phase to the mean of the two quiet ones (the machine may be shared: the quiet phases on both
sides make a drift visible), and what the hostile client got back.

    .venv/bin/python simulations/soak_serving.py [--seconds 20] [--callers 2] [--rate 40] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_serving import build_registry, start_server
from sklearn.datasets import load_breast_cancer

from fedaiot.registry.signing import load_private_key
from fedaiot.serving.auth import issue_token

BIG_BODY = json.dumps({"instances": [[1] * 30] * 100_000}, separators=(",", ":")).encode()
MAX_LOOPS = 100_000  # per hostile thread, besides the deadline


def _post_head(length: int, token: str | None) -> bytes:
    lines = ["POST /v1/predict HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    lines += ["Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(sock: socket.socket) -> str:
    try:
        answer = sock.recv(256)
    except OSError as exc:
        return type(exc).__name__
    parts = answer.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 and answer.startswith(b"HTTP/") else "closed"


def _upload(port: int, token: str | None, deadline: float, tally: Counter[str]) -> None:
    for _ in range(MAX_LOOPS):
        if time.monotonic() > deadline:
            return
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                # Refused and closed before it was all sent: what we hope for.
                with contextlib.suppress(OSError):
                    sock.sendall(_post_head(len(BIG_BODY), token) + BIG_BODY)
                tally[_status(sock)] += 1
        except OSError as exc:
            tally[type(exc).__name__] += 1


def _slowloris(port: int, connections: int, deadline: float, tally: Counter[str]) -> None:
    """Keep ``connections`` connections sending headers a byte a second; reopen closed ones."""
    socks: list[socket.socket] = []
    for _ in range(MAX_LOOPS):
        if time.monotonic() > deadline:
            break
        while len(socks) < connections:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                socks.append(sock)
                tally["slow opened"] += 1
            except OSError as exc:
                tally[type(exc).__name__] += 1
                break
        for sock in list(socks):
            try:
                sock.sendall(b"X")
            except OSError:
                tally["slow closed by server"] += 1
                socks.remove(sock)
                sock.close()
        time.sleep(1.0)
    for sock in socks:
        sock.close()


def _stalled_bodies(
    port: int, token: str, connections: int, deadline: float, tally: Counter[str]
) -> None:
    """Authenticated requests that announce 10 kB and send 100 bytes; reopened when answered."""
    open_socks: list[socket.socket] = []
    for _ in range(MAX_LOOPS):
        if time.monotonic() > deadline:
            break
        while len(open_socks) < connections:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(_post_head(10_000, token) + b'{"instances": [[' + b"1," * 40)
                sock.setblocking(False)
                open_socks.append(sock)
                tally["stalled body opened"] += 1
            except OSError as exc:
                tally[type(exc).__name__] += 1
                break
        for sock in list(open_socks):
            try:
                answer = sock.recv(256)
            except BlockingIOError:
                continue
            except OSError:
                answer = b""
            parts = answer.split(b" ", 2)
            tally[f"stalled body {parts[1].decode() if len(parts) > 1 else 'closed'}"] += 1
            open_socks.remove(sock)
            sock.close()
        time.sleep(0.5)
    for sock in open_socks:
        sock.close()


def hostile(port: int, token: str, args: dict[str, Any], seconds: float, out: Any) -> None:
    """The hostile client, in a process of its own; puts its tallies on ``out``."""
    deadline = time.monotonic() + seconds
    tallies: dict[str, Counter[str]] = {
        "tokenless 6 MB": Counter(),
        "6 MB with a token": Counter(),
        "slowloris": Counter(),
        "stalled bodies": Counter(),
    }
    threads = [
        threading.Thread(target=_upload, args=(port, None, deadline, tallies["tokenless 6 MB"]))
        for _ in range(args["uploaders"])
    ]
    threads.append(
        threading.Thread(target=_upload, args=(port, token, deadline, tallies["6 MB with a token"]))
    )
    threads.append(
        threading.Thread(
            target=_slowloris, args=(port, args["slow"], deadline, tallies["slowloris"])
        )
    )
    threads.append(
        threading.Thread(
            target=_stalled_bodies,
            args=(port, token, args["slow"], deadline, tallies["stalled bodies"]),
        )
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    out.put({name: dict(tally) for name, tally in tallies.items()})


def normal_callers(
    url: str, tokens: list[str], rate: float, seconds: float
) -> tuple[np.ndarray, int, int]:
    """(latencies in s, requests, failures) of paced 1-row predictions from each token."""
    row = load_breast_cancer().data[0].tolist()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def caller(token: str, offset: float) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            start = time.perf_counter() + offset
            for i in range(int(seconds * rate)):
                pause = start + i / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                began = time.perf_counter()
                try:
                    ok = client.post("/v1/predict", json={"instances": [row]}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - began
                with lock:
                    latencies.append(took)
                    failures[0] += not ok

    threads = [
        threading.Thread(target=caller, args=(token, k / (rate * len(tokens))))
        for k, token in enumerate(tokens)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    return np.asarray(latencies), len(latencies), failures[0]


def _summary(latencies: np.ndarray, requests: int, failures: int) -> dict[str, float]:
    return {
        "requests": float(requests),
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "error_rate": failures / max(1, requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--callers", type=int, default=2, help="normal callers")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s of each caller")
    parser.add_argument("--uploaders", type=int, default=2, help="tokenless 6 MB uploaders")
    parser.add_argument("--slow", type=int, default=50, help="slowloris and stalled bodies")
    parser.add_argument(
        "--no-gate", action="store_true", help="serve with block_flooding_addresses off"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.hold = 5.0  # the server's blocked_hold_seconds (default)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        private_path, public_path = build_registry(root)
        key = load_private_key(private_path)
        tokens = [
            issue_token(key, subject=f"caller-{i}", role="clinician", ttl_seconds=3600)
            for i in range(args.callers)
        ]
        attacker = issue_token(key, subject="insider", role="clinician", ttl_seconds=3600)
        # The default limits, but for the daily row quota: the normal callers predict more
        # rows in a run than a clinician may in a day.
        limits = {"clinician": {"rows_per_day": 10**12}}
        env = {"FEDAIOT_SERVE_RATE_LIMITS": json.dumps(limits)}
        if args.no_gate:
            env["FEDAIOT_SERVE_BLOCK_FLOODING_ADDRESSES"] = "false"
        process, url = start_server(root, public_path, env)
        port = int(url.rsplit(":", 1)[1])
        try:
            normal_callers(url, tokens, args.rate, 2.0)  # warm-up
            alone = _summary(*normal_callers(url, tokens, args.rate, args.seconds))
            context = multiprocessing.get_context("spawn")
            out = context.Queue()
            enemy = context.Process(
                target=hostile, args=(port, attacker, vars(args), args.seconds + 3.0, out)
            )
            enemy.start()
            time.sleep(2.0)  # the hostile client is up and running before the measurement
            under_attack = _summary(*normal_callers(url, tokens, args.rate, args.seconds))
            hostile_tally = out.get(timeout=args.seconds + 120)
            enemy.join(60)
            time.sleep(args.hold + 1.0)  # connections the server held are gone
            after = _summary(*normal_callers(url, tokens, args.rate, args.seconds))
        finally:
            process.terminate()
            process.wait(10)
    quiet_p50 = (alone["p50_ms"] + after["p50_ms"]) / 2
    quiet_p99 = (alone["p99_ms"] + after["p99_ms"]) / 2
    results = {
        "alone": alone,
        "hostile": under_attack,
        "alone again": after,
        "ratio_p50": under_attack["p50_ms"] / quiet_p50,
        "ratio_p99": under_attack["p99_ms"] / quiet_p99,
        "hostile_client": hostile_tally,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{os.cpu_count()} CPUs, loopback; {args.callers} callers x {args.rate:g} req/s, 1 row, "
        f"{args.seconds:g} s a phase"
    )
    print("| phase | requests | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for phase in ("alone", "hostile", "alone again"):
        r = results[phase]
        print(
            f"| {phase} | {r['requests']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['error_rate']:.2%} |"
        )
    print(
        f"hostile / quiet (mean of both alone phases): p50 {results['ratio_p50']:.2f}x, "
        f"p99 {results['ratio_p99']:.2f}x"
    )
    for name, tally in hostile_tally.items():
        print(f"hostile {name}: {dict(sorted(tally.items()))}")


if __name__ == "__main__":
    main()
