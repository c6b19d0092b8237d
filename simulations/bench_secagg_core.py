"""Cost of one SecAgg+ round in memory, against the plain weighted sum it replaces.

For each number of nodes and vector length, times :func:`fedaiot.secagg.run_round_in_memory`
(every node and the server in this one process, single-threaded; default degree and threshold;
median of ``--repeats`` rounds) against ``sum_i w_i * x_i`` in numpy, and counts the payload bytes
each node sends (every message's record: keys, share ciphertexts, the masked ``uint64`` vector,
unmask shares) against a plain ``float32`` update (4 bytes per parameter). Usage::

    python simulations/bench_secagg_core.py [--nodes 10 20 50] [--lengths 100000 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from fedaiot.secagg import RoundTrace, run_round_in_memory
from fedaiot.secagg.crypto import expand


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(n: int, length: int, repeats: int, rng: np.random.Generator) -> str:
    vectors = {i: rng.normal(scale=0.1, size=length) for i in range(1, n + 1)}
    weights = {i: float(rng.integers(10, 1000)) for i in vectors}

    def plain() -> object:
        return np.sum([w * vectors[i] for i, w in weights.items()], axis=0)

    t_plain = _median_seconds(plain, repeats)
    times, trace = [], RoundTrace()
    for _ in range(repeats):
        trace = RoundTrace()
        start = time.perf_counter()
        got, total = run_round_in_memory(vectors, weights, trace=trace)
        times.append(time.perf_counter() - start)
    t_secure = statistics.median(times)
    want = np.sum([weights[i] * vectors[i] for i in vectors], axis=0)
    err = float(np.max(np.abs(got - want)))
    assert total == sum(weights.values()) and err <= n * 2.0**-25 * 1.001, err
    assert trace.setup is not None
    sent = statistics.mean(trace.sent.values())
    return (
        f"{n:>4} {length:>9} {trace.setup.degree:>3} {trace.setup.threshold:>3} "
        f"{t_plain * 1e3:>9.1f} {t_secure:>9.2f} {t_secure / t_plain:>7.0f} "
        f"{trace.client_seconds / n:>7.3f} {trace.server_seconds:>8.3f} {err:>9.1e} "
        f"{sent:>14,.0f} {4 * length:>13,} {sent / (4 * length):>5.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    seed = bytes(range(32))
    prg = _median_seconds(lambda: expand(seed, 1_000_000), 7)
    print(f"PRG (AES-256-CTR): 1M uint64 in {prg * 1e3:.2f} ms")

    header = (
        f"{'n':>4} {'length':>9} {'k':>3} {'t':>3} {'plain ms':>9} {'secagg s':>9} {'ratio':>7} "
        f"{'node s':>7} {'server s':>8} {'max err':>9} {'B/node secagg':>14} {'B/node plain':>13} "
        f"{'x':>5}"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for n in args.nodes:
        for length in args.lengths:
            print(_row(n, length, args.repeats, rng), flush=True)


if __name__ == "__main__":
    main()
