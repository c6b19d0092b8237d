"""A node's part in a distributed-DP round: one DP-SGD step's clipped gradient sum, as an
integer vector carrying this node's share of the noise (``fedaiot.privacy.distributed``).

The vector is ``[share..., noisy count]``: the coordinator needs the nodes' summed noisy counts
to divide by the expected batch, and learns only their sum. It leaves the node only inside
secure aggregation (the run configuration refuses ``dp-mode=distributed`` without it), and the
round's charge is released when it is masked.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.node.round import round_randomness
from fedaiot.node.training import StateDict
from fedaiot.privacy import budget
from fedaiot.privacy.budget import BudgetTerms
from fedaiot.privacy.cohorts import Cohort, decide_cohorts, open_cohorts
from fedaiot.privacy.distributed import ShareGeometry, encode_share, honest_shares
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.tasks import ArrayData, Task
from fedaiot.wire.replies import REFUSED, TRAINED, NodeReply

CHUNK = 512  # records per backward pass: bounds the per-record gradients held at once
CLIP_MARGIN = 1 - 1e-5


def parameter_count(model: nn.Module) -> int:
    return sum(v.numel() for v in model.state_dict().values())


def clipped_gradient_sum(
    model: nn.Module, data: ArrayData, *, sample_rate: float, clip: float, randomness: SecureRandom
) -> npt.NDArray[np.float64]:
    """The sum over a Poisson sample of ``data`` (rate ``sample_rate``, drawn from
    ``randomness``) of each record's loss gradient clipped to L2 norm ``clip``, flattened in
    the model's ``state_dict`` order (zeros for buffers)."""
    ModuleValidator.validate(model, strict=True)
    chosen = np.flatnonzero(randomness.bernoulli(len(data), sample_rate))
    names = list(model.state_dict())
    sums = {
        name: torch.zeros_like(value, dtype=torch.float64)
        for name, value in model.state_dict().items()
    }
    if len(chosen):
        private = GradSampleModule(model, loss_reduction="sum")
        parameters = dict(model.named_parameters())
        criterion = nn.CrossEntropyLoss(reduction="sum")
        x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        model.train()
        for start in range(0, len(chosen), CHUNK):
            rows = torch.from_numpy(chosen[start : start + CHUNK])
            private.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                criterion(private(x[rows]), y[rows]).backward()
            grads = {n: p.grad_sample for n, p in parameters.items()}  # type: ignore[attr-defined]
            squares = torch.stack([(g.flatten(1).double() ** 2).sum(1) for g in grads.values()])
            # float32 products may round a clipped record up by ~1e-7: aim a hair below C
            factor = torch.clamp(CLIP_MARGIN * clip / (squares.sum(0).sqrt() + 1e-12), max=1.0)
            for name, grad in grads.items():
                weighted = torch.einsum("b,b...->...", factor.float(), grad)
                sums[name] += weighted.double()
        private.to_standard_module()
    return np.concatenate([sums[n].flatten().numpy() for n in names])


def gradient_share(
    cfg: RunConfig,
    *,
    node: str,
    data: ArrayData,
    global_state: StateDict,
    server_round: int,
    run_key: str,
    ledger_dir: Path,
    survivors: int,
    task: Task,
    cohorts: list[Cohort] | None = None,
    epsilon_cap: float | None = None,
) -> NodeReply:
    """This node's noisy integer share of the round's gradient sum, or a refusal.

    ``survivors`` is the fewest nodes the round may unmask (``survivor_floor``; the node
    refuses to unmask fewer): the noise share is sized so that any ``survivors -
    dp-collusion`` shares reach the target.
    """
    torch.set_num_threads(1)
    honest = honest_shares(survivors, cfg.dp_collusion)
    if honest < 1:
        raise ConfigError(
            f"dp-collusion {cfg.dp_collusion} leaves no honest noise share in a sum of "
            f"{survivors} nodes: lower dp-collusion"
        )
    started = time.perf_counter()
    model = task.build_model()
    model.load_state_dict(global_state)
    geometry = ShareGeometry.of(parameter_count(model), cfg.max_grad_norm)
    cohorts = open_cohorts(ledger_dir, data) if cohorts is None else cohorts
    randomness = round_randomness(cfg, node, server_round)
    decision = decide_cohorts(
        cohorts,
        BudgetTerms.for_run(cfg, epsilon_cap),
        run=run_key,
        server_round=server_round,
        randomness=randomness,
        distributed=(geometry, honest),
    )
    if not decision.granted:
        metrics = {"epsilon": decision.epsilon, "delta": cfg.delta}
        return NodeReply(
            REFUSED, node, 0.0, metrics, reason="budget-exhausted", detail=decision.reason
        )
    assert decision.plan is not None
    sigma = decision.plan.noise_multiplier
    usable = data.take(decision.rows) if len(decision.rows) < len(data) else data
    summed = clipped_gradient_sum(
        model, usable, sample_rate=decision.plan.sample_rate, clip=cfg.max_grad_norm,
        randomness=randomness,
    )  # fmt: skip
    share = encode_share(summed, geometry, geometry.share_variance(sigma, honest), randomness)
    vector = np.append(share, float(decision.weight))
    metrics = {
        "epsilon": decision.epsilon,
        "epsilon-local": decision.local_epsilon,
        "delta": cfg.delta,
        "noise-multiplier": sigma,
        "honest-shares": float(honest),
        "examples": float(len(usable)),
        "train-seconds": time.perf_counter() - started,
    }
    pending = budget.PendingRelease.of([c.ledger for c in decision.charged], run_key, server_round)
    if not math.isfinite(decision.local_epsilon):
        metrics.pop("epsilon-local")
    return NodeReply(TRAINED, node, 1.0, metrics, vector=vector, pending=pending)
