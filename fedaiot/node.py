"""What a node does in a round: check its budget, train privately, account, and reply.

Flower-free on purpose: ``clients/client_app.py`` turns messages into calls of
:func:`train_round`, and tests call it directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from fedaiot.config import RunConfig
from fedaiot.privacy.accounting import BudgetExhaustedError, epsilon_spent, plan_noise
from fedaiot.privacy.ledger import NoisePlan, PrivacyLedger, RoundEntry
from fedaiot.sent_updates import SentUpdate, state_digest
from fedaiot.tasks import ArrayData, FederatedData, Task, federate, get_task
from fedaiot.training import (
    LocalSchedule,
    StateDict,
    batches_per_epoch,
    sample_rate,
    train_plain,
    train_private,
)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class NodeReply:
    """``status`` is "trained" (``state`` holds the update) or "refused" (``reason`` says why)."""

    status: str
    node: str
    examples: int
    metrics: dict[str, float]
    state: StateDict | None = None
    reason: str = ""


def dataset_fingerprint(data: ArrayData) -> str:
    digest = hashlib.sha256()
    digest.update(str(data.x.shape).encode())
    digest.update(data.x.tobytes())
    digest.update(data.y.tobytes())
    return digest.hexdigest()


def simulated_federation(cfg: RunConfig, num_partitions: int) -> FederatedData:
    """The run's split of its task into a held-out test set and one partition per node."""
    return federate(
        get_task(cfg.task),
        num_partitions,
        partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        classes_per_node=cfg.classes_per_node,
        seed=cfg.seed,
    )


def simulated_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> ArrayData:
    """The data a simulated node holds: its partition of the task's training pool."""
    return simulated_federation(cfg, num_partitions).partitions[partition_id]


def schedule_of(cfg: RunConfig, proximal_mu: float = 0.0) -> LocalSchedule:
    return LocalSchedule(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        momentum=cfg.momentum,
        proximal_mu=proximal_mu,
    )


def _plan(cfg: RunConfig, ledger: PrivacyLedger, run_key: str, examples: int) -> NoisePlan:
    """The run's noise plan: read from the ledger, or made once against what is already spent."""
    with ledger.update() as record:
        if run_key in record.plans:
            return record.plans[run_key]
        q = sample_rate(examples, cfg.batch_size)
        steps = cfg.local_epochs * batches_per_epoch(examples, cfg.batch_size)
        sigma = plan_noise(
            target_epsilon=cfg.epsilon,
            delta=cfg.delta,
            sample_rate=q,
            steps=steps * cfg.num_rounds,
            spent=record.history,
        )
        plan = NoisePlan(
            noise_multiplier=sigma,
            sample_rate=q,
            steps_per_round=steps,
            rounds=cfg.num_rounds,
            target_epsilon=cfg.epsilon,
            delta=cfg.delta,
        )
        record.plans[run_key] = plan
        return plan


def _returns_freed_memory(function: Callable[P, R]) -> Callable[P, R]:
    """Hand freed heap back to the system after each call.

    glibc otherwise keeps the fragments of every round's per-sample gradients: a simulated
    node's worker grew to 7.7 GB over 9 Fashion-MNIST rounds and was killed by Ray's
    out-of-memory guard. With the trim it stays near its first round's size.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
                ctypes.CDLL("libc.so.6").malloc_trim(0)

    return wrapper


@_returns_freed_memory
def train_round(
    cfg: RunConfig,
    *,
    node: str,
    data: ArrayData,
    global_state: StateDict,
    server_round: int,
    run_key: str,
    ledger_path: Path,
    proximal_mu: float = 0.0,
    dataset_id: str | None = None,
) -> NodeReply:
    """One round of local training, or a refusal when it would overrun the privacy budget.

    ``dataset_id`` ties the ledger to the data (default: the fingerprint of ``data``); a
    deployed node passes its raw files' fingerprint, which no normalization can change.
    """
    torch.set_num_threads(1)  # nodes share the machine's cores with each other
    task: Task = get_task(cfg.task)
    model = task.build_model()
    model.load_state_dict(global_state)
    schedule = schedule_of(cfg, proximal_mu)
    seed = cfg.seed * 100_003 + server_round * 1_009 + zlib.crc32(node.encode()) % 997
    started = time.perf_counter()

    if not cfg.private:
        outcome = train_plain(model, data, schedule, seed=seed)
        metrics = _metrics(len(data), outcome.loss, math.inf, cfg.delta, 0.0, started)
        return NodeReply("trained", node, len(data), metrics, outcome.state)

    dataset = dataset_id or dataset_fingerprint(data)
    ledger = PrivacyLedger(ledger_path, node=node, dataset=dataset)
    try:
        plan = _plan(cfg, ledger, run_key, len(data))
    except BudgetExhaustedError as exc:
        spent = ledger.epsilon(cfg.delta)
        return _refusal(node, len(data), cfg, spent, f"{node}: {exc}", started)

    digest = state_digest(global_state)
    sent = SentUpdate.path_for(ledger_path)
    resend = SentUpdate.read(sent, run_key, server_round)
    if resend is not None and resend.digest == digest:
        # this very update already left the node (a restarted coordinator asks again):
        # sending it again releases nothing new, so it costs nothing
        return NodeReply("trained", node, len(data), resend.metrics, resend.state)

    step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    try:
        history, epsilon = _charge(
            ledger, cfg, step, run_key, server_round, len(data), released=resend is not None
        )
    except _AlreadyCharged as charged:
        history, epsilon = charged.history, charged.epsilon
    except _OverBudget as exc:
        return _refusal(node, len(data), cfg, exc.spent, f"{node}: {exc}", started)

    outcome = train_private(
        model,
        data,
        schedule,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
        history=history,
        seed=seed,
    )
    if outcome.steps != plan.steps_per_round:  # Poisson loaders take a fixed number of steps
        raise RuntimeError(
            f"{node}: trained {outcome.steps} steps, {plan.steps_per_round} were accounted"
        )
    metrics = _metrics(len(data), outcome.loss, epsilon, cfg.delta, plan.noise_multiplier, started)
    metrics["sample-rate"] = plan.sample_rate
    metrics["steps"] = float(outcome.steps)
    SentUpdate(run_key, server_round, digest, outcome.state, metrics).write(sent)
    return NodeReply("trained", node, len(data), metrics, outcome.state)


class _AlreadyCharged(Exception):
    def __init__(self, history: list[tuple[float, float, int]], epsilon: float) -> None:
        super().__init__("already charged")
        self.history = history
        self.epsilon = epsilon


class _OverBudget(Exception):
    def __init__(self, message: str, spent: float) -> None:
        super().__init__(message)
        self.spent = spent


def _with_step(
    history: list[tuple[float, float, int]], step: tuple[float, float, int]
) -> list[tuple[float, float, int]]:
    """The history after ``step``, merged into the last entry as Opacus' accountant does."""
    if history and history[-1][:2] == step[:2]:
        return [*history[:-1], (step[0], step[1], history[-1][2] + step[2])]
    return [*history, step]


def _charge(
    ledger: PrivacyLedger,
    cfg: RunConfig,
    step: tuple[float, float, int],
    run_key: str,
    server_round: int,
    examples: int,
    *,
    released: bool,
) -> tuple[list[tuple[float, float, int]], float]:
    """Check the round against the budget and write it into the ledger before training.

    Charging first, under the ledger's lock, means that two runs drawing on one node's budget
    (or anything else appending to the ledger meanwhile) can never both pass the check with
    the same remaining budget. A round charged before whose update never left the node (it
    crashed while training) is not charged again: an output nobody saw costs nothing, so the
    retry runs under the first charge. ``released`` says an update of this round did leave.
    Returns the history before this round, and epsilon after it.
    """
    with ledger.update() as record:
        charged = [e for e in record.rounds if e.run == run_key and e.round == server_round]
        if charged and not released:
            raise _AlreadyCharged(list(record.history), charged[-1].epsilon)
        spent = epsilon_spent(record.history, cfg.delta)
        after = epsilon_spent(_with_step(record.history, step), cfg.delta)
        if after > cfg.epsilon:
            raise _OverBudget(
                f"privacy budget exhausted: this round would raise epsilon from "
                f"{spent:.3f} to {after:.3f}, over the budget of {cfg.epsilon:.3f} "
                f"(delta {cfg.delta:g})",
                spent,
            )  # raised inside the lock: nothing is written
        before = list(record.history)
        record.history = _with_step(record.history, step)
        record.rounds.append(
            RoundEntry(
                run=run_key,
                round=server_round,
                noise_multiplier=step[0],
                sample_rate=step[1],
                steps=step[2],
                epsilon=after,
                delta=cfg.delta,
                examples=examples,
            )
        )
    return before, after


def _metrics(
    examples: int, loss: float, epsilon: float, delta: float, sigma: float, started: float
) -> dict[str, float]:
    return {
        "num-examples": float(examples),
        "train-loss": loss,
        "epsilon": epsilon,
        "delta": delta,
        "noise-multiplier": sigma,
        "train-seconds": time.perf_counter() - started,
    }


def _refusal(
    node: str, examples: int, cfg: RunConfig, spent: float, reason: str, started: float
) -> NodeReply:
    metrics = _metrics(examples, math.nan, spent, cfg.delta, 0.0, started)
    return NodeReply("refused", node, examples, metrics, reason=reason)
