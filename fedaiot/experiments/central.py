"""Central baselines: the same model and budget, trained by one party holding every record.

Federated results are read against these: what would the same (epsilon, delta) buy if the
institutions pooled their data (which they cannot), and what does the model reach without
privacy at all?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedaiot.node.training import (
    LocalSchedule,
    PrivateSteps,
    batches_per_epoch,
    sample_rate,
    train_plain,
    train_private,
)
from fedaiot.privacy.accounting import epsilon_spent, plan_noise
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.tasks import ArrayData, FederatedData, federate, get_task
from fedaiot.tasks.evaluation import evaluate


@dataclass(frozen=True)
class CentralOutcome:
    model: nn.Module
    pool: ArrayData  # the records it trained on
    test: ArrayData  # held out, never trained on
    metrics: dict[str, float]
    epsilon: float  # spent; inf when non-private


def pooled(fed: FederatedData) -> ArrayData:
    return ArrayData(
        np.concatenate([p.x for p in fed.partitions]), np.concatenate([p.y for p in fed.partitions])
    )


def train_central(
    task_name: str,
    epsilon: float | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_grad_norm: float,
    seed: int,
    delta: float = 1e-5,
) -> CentralOutcome:
    """Train on the pooled training data of the task (``epsilon=None``: non-private).

    The pool and the held-out test set are those of every federated run with this seed, so
    the numbers compare like for like.
    """
    task = get_task(task_name)
    fed = federate(task, 1, partitioner="iid", seed=seed)
    pool = pooled(fed)
    torch.manual_seed(seed)
    model = task.build_model()
    schedule = LocalSchedule(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    spent = fit(
        model,
        pool,
        schedule,
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        seed=seed,
    )
    metrics = evaluate(model, fed.test, positive_class=task.positive_class)
    return CentralOutcome(model, pool, fed.test, metrics, spent)


def fit(
    model: nn.Module,
    data: ArrayData,
    schedule: LocalSchedule,
    *,
    epsilon: float | None,
    delta: float,
    max_grad_norm: float,
    seed: int,
    max_noise: float = 20.0,
) -> float:
    """Train ``model`` in place on ``data``: DP-SGD with its noise planned for ``epsilon`` over
    the whole schedule, or plain SGD (``epsilon=None``). Returns the epsilon spent (inf)."""
    if epsilon is None:
        train_plain(model, data, schedule, seed=seed)
        return float("inf")
    q = sample_rate(len(data), schedule.batch_size)
    steps = schedule.epochs * batches_per_epoch(len(data), schedule.batch_size)
    sigma = plan_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps, max_noise=max_noise
    )
    mechanism = PrivateSteps(
        sample_rate=q, steps=steps, noise_multiplier=sigma, max_grad_norm=max_grad_norm
    )
    # A baseline on public reference data protects no one: reproducible from its seed.
    train_private(model, data, schedule, mechanism, randomness=SecureRandom.seeded("central", seed))
    return epsilon_spent([(sigma, q, steps)], delta)
