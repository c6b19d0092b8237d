"""What drawing DP-SGD's noise and sampling from a secure generator costs, per step.

For each task, times a node's round of DP-SGD (the real :func:`fedaiot.node.training.train_private`:
Opacus' per-sample gradients and clipping) twice, side by side and interleaved: with the noise
and Poisson sampling drawn from :class:`fedaiot.privacy.randomness.SecureRandom` (ChaCha20 keyed
from the OS, what nodes use) and from torch's own generator (what Opacus does without its secure
mode). Also times the noise alone for the model's parameter count. Prints medians and ratios::

    python simulations/bench_secure_noise.py [--tasks digits breast-cancer fashion-mnist]
        [--repeats 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_partition
from fedaiot.node.training import LocalSchedule, PrivateSteps, train_private
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.tasks import get_task


class TorchRandom:
    """The same interface over torch's Mersenne Twister: Opacus' default, predictable."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, count: int, std: float = 1.0) -> np.ndarray[Any, Any]:
        return torch.normal(0.0, std, (count,), generator=self.generator).numpy()

    def bernoulli(self, count: int, probability: float) -> np.ndarray[Any, Any]:
        return (torch.rand(count, generator=self.generator) < probability).numpy()


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _row(task_name: str, repeats: int, steps: int) -> str:
    torch.set_num_threads(1)
    cfg = RunConfig(task=task_name, partitioner="iid")
    task = get_task(task_name)
    data = simulated_partition(cfg, 0, 10)
    model = task.build_model()
    size = sum(p.numel() for p in model.parameters())
    mechanism = PrivateSteps(
        sample_rate=min(1.0, 64 / len(data)), steps=steps, noise_multiplier=1.0, max_grad_norm=1.0
    )
    schedule = LocalSchedule(epochs=1, batch_size=64, learning_rate=0.1)

    def round_with(randomness: object) -> None:
        train_private(
            task.build_model(), data, schedule, mechanism, randomness=cast(SecureRandom, randomness)
        )

    secure_times, torch_times = [], []
    round_with(SecureRandom())  # warm-up: imports, allocator
    for repeat in range(repeats):  # interleaved, so that load on the machine hits both alike
        secure_times.append(_seconds(lambda: round_with(SecureRandom())))
        torch_times.append(_seconds(lambda r=repeat: round_with(TorchRandom(r))))
    secure_step = statistics.median(secure_times) / steps
    torch_step = statistics.median(torch_times) / steps

    noise_secure = statistics.median(
        _seconds(lambda: SecureRandom().normal(size)) for _ in range(repeats)
    )
    noise_torch = statistics.median(
        _seconds(lambda: torch.normal(0.0, 1.0, (size,))) for _ in range(repeats)
    )
    return (
        f"{task_name:<14} {size:>9,} {len(data):>7} {torch_step * 1e3:>10.2f} "
        f"{secure_step * 1e3:>11.2f} {secure_step / torch_step:>6.2f} "
        f"{noise_torch * 1e3:>9.3f} {noise_secure * 1e3:>10.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["breast-cancer", "digits", "fashion-mnist"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(
        f"{'task':<14} {'params':>9} {'records':>7} {'torch ms':>10} {'secure ms':>11} "
        f"{'ratio':>6} {'noise t':>9} {'noise s':>10}"
    )
    print("  (per DP-SGD step, median of rounds; 'noise': one draw for every parameter, ms)")
    for name in args.tasks:
        print(_row(name, args.repeats, args.steps), flush=True)


if __name__ == "__main__":
    main()
