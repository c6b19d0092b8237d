"""What a node does in a round: ask its budget, train privately, and reply.

Flower-free on purpose: ``clients/client_app.py`` turns messages into calls of
:func:`train_round`, and tests call it directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from fedaiot.config.run import RunConfig
from fedaiot.node.training import LocalSchedule, PrivateSteps, StateDict, train_plain, train_private
from fedaiot.privacy import budget
from fedaiot.privacy.budget import BudgetTerms
from fedaiot.privacy.cohorts import Cohort, decide_cohorts, open_cohorts
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.tasks import ArrayData, FederatedData, Task, federate, get_task
from fedaiot.wire.replies import REFUSED, TRAINED, NodeReply

P = ParamSpec("P")
R = TypeVar("R")


def simulated_federation(cfg: RunConfig, num_partitions: int) -> FederatedData:
    """The run's split of its task into a held-out test set and one partition per node."""
    return federate(
        get_task(cfg.task),
        num_partitions,
        partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        classes_per_node=cfg.classes_per_node,
        seed=cfg.seed,
        validation=cfg.holdout == "validation",
    )


def simulated_ledger_dir(cfg: RunConfig, partition_id: int) -> Path:
    """A simulated node's ledger folder: its own, as an institution's would be."""
    return cfg.output_path / "ledgers" / f"node-{partition_id}"


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


def round_randomness(cfg: RunConfig, node: str, server_round: int) -> SecureRandom:
    """A fresh key from the OS for every round; from the seed only in a research run that
    asked for it (``seeded-noise``), whose manifests say it is not private."""
    if cfg.seeded_noise:
        return SecureRandom.seeded(cfg.seed, node, server_round)
    return SecureRandom()


def bound_update(global_state: StateDict, state: StateDict, bound: float) -> StateDict:
    """``state``, or the state whose change from ``global_state`` is scaled to norm ``bound``."""
    change = {k: state[k].double() - global_state[k].double() for k in state}
    norm = float(torch.sqrt(torch.stack([(c**2).sum() for c in change.values()]).sum()))
    if norm <= bound:
        return state
    scale = bound / norm
    return {k: (global_state[k].double() + scale * change[k]).to(state[k].dtype) for k in state}


@_returns_freed_memory
def train_round(
    cfg: RunConfig,
    *,
    node: str,
    data: ArrayData,
    global_state: StateDict,
    server_round: int,
    run_key: str,
    ledger_dir: Path,
    proximal_mu: float = 0.0,
    cohorts: list[Cohort] | None = None,
    released_on_return: bool = True,
    epsilon_cap: float | None = None,
    task: Task | None = None,
    max_weight: float = math.inf,
) -> NodeReply:
    """One round of local training, or a refusal when it would overrun the privacy budget.

    The round trains on the records of every cohort whose ledger (in ``ledger_dir``) can pay
    for it (``fedaiot.privacy.cohorts``); ``cohorts`` says which rows of ``data`` are in which
    (default: ``data``'s own; a deployed node identifies its raw records, a study its table's
    rows). With ``released_on_return`` the
    round's charge is marked released before the reply is returned, as the reply carries the
    update; otherwise the caller marks it (:func:`fedaiot.privacy.budget.mark_released`) when
    the update leaves in another form (a masked vector). ``max_weight`` caps the node's
    weight in the average (a study's ``max_examples``).
    """
    torch.set_num_threads(1)  # nodes share the machine's cores with each other
    task = task or get_task(cfg.task)
    model = task.build_model()
    model.load_state_dict(global_state)
    schedule = schedule_of(cfg, proximal_mu)
    started = time.perf_counter()

    if not cfg.private:
        seed = cfg.seed * 100_003 + server_round * 1_009 + zlib.crc32(node.encode()) % 997
        outcome = train_plain(model, data, schedule, seed=seed)
        metrics = {
            "num-examples": float(len(data)),
            "train-loss": outcome.loss,
            "epsilon": math.inf,
            "delta": cfg.delta,
            "noise-multiplier": 0.0,
            "train-seconds": time.perf_counter() - started,
        }
        return NodeReply(TRAINED, node, float(len(data)), metrics, outcome.state)

    cohorts = open_cohorts(ledger_dir, data) if cohorts is None else cohorts
    randomness = round_randomness(cfg, node, server_round)
    decision = decide_cohorts(
        cohorts,
        BudgetTerms.for_run(cfg, epsilon_cap),
        run=run_key,
        server_round=server_round,
        randomness=randomness,
    )
    if not decision.granted:
        metrics = {"epsilon": decision.epsilon, "delta": cfg.delta}
        return NodeReply(
            REFUSED, node, 0.0, metrics, reason="budget-exhausted", detail=decision.reason
        )
    assert decision.plan is not None
    mechanism = PrivateSteps(
        sample_rate=decision.plan.sample_rate,
        steps=decision.plan.steps_per_round,
        noise_multiplier=decision.plan.noise_multiplier,
        max_grad_norm=cfg.max_grad_norm,
    )
    usable = data.take(decision.rows) if len(decision.rows) < len(data) else data
    outcome = train_private(model, usable, schedule, mechanism, randomness=randomness)
    bounded = bound_update(global_state, outcome.state, cfg.max_update_norm)
    weight = min(decision.weight, max_weight)
    ledgers = [c.ledger for c in decision.charged]
    pending = budget.PendingRelease.of(ledgers, run_key, server_round)
    if released_on_return:
        pending.release()
    metrics = {
        "num-examples": weight,
        "epsilon": decision.epsilon,
        "delta": cfg.delta,
        "noise-multiplier": mechanism.noise_multiplier,
        # for the node's own console only: never in the clear (replies.CLEAR_METRICS)
        "train-loss": outcome.loss,
        "examples": float(len(usable)),
        "train-seconds": time.perf_counter() - started,
        "update-clipped": float(bounded is not outcome.state),
    }
    return NodeReply(
        TRAINED,
        node,
        weight,
        metrics,
        bounded,
        pending=None if released_on_return else pending,
    )
