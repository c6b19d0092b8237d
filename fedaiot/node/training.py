"""Local training (DP-SGD through Opacus, or plain SGD for baselines) and evaluation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedaiot.privacy.randomness import SecureRandom
from fedaiot.tasks import ArrayData

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalSchedule:
    """How a node trains in one round; ``proximal_mu`` > 0 pulls towards the global model."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class TrainOutcome:
    state: StateDict
    loss: float
    steps: int


def batches_per_epoch(examples: int, batch_size: int) -> int:
    return max(1, math.ceil(examples / batch_size))


def sample_rate(examples: int, batch_size: int) -> float:
    """Poisson rate of one expected batch of ``batch_size`` per ``1/q`` steps (central
    baselines, whose data set size is no secret)."""
    return 1.0 / batches_per_epoch(examples, batch_size)


def _loader(data: ArrayData, batch_size: int, seed: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    tensors = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(tensors, batch_size=batch_size, shuffle=True, generator=generator)


@dataclass(frozen=True)
class PrivateSteps:
    """The DP-SGD mechanism of one round: ``steps`` Poisson-sampled steps at rate
    ``sample_rate``, each per-record gradient clipped to ``max_grad_norm`` and the sum noised
    with ``noise_multiplier x max_grad_norm``."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float


class SecureNoiseOptimizer(DPOptimizer):
    """Opacus' optimizer with its noise drawn from :class:`SecureRandom` instead of torch.

    Opacus clips and sums the per-record gradients (its own noise is switched off by a zero
    multiplier); this adds Gaussian noise of ``std`` to the sum, all parameters at once.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        std: float,
        max_grad_norm: float,
        expected_batch_size: float,
        randomness: SecureRandom,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
        )
        self.std = std
        self.randomness = randomness

    def add_noise(self) -> None:
        super().add_noise()  # the clipped sum into p.grad, plus zero noise
        sizes = [p.grad.numel() for p in self.params]
        noise = torch.from_numpy(self.randomness.normal(sum(sizes), self.std))
        for p, chunk in zip(self.params, torch.split(noise, sizes), strict=True):
            p.grad += chunk.view_as(p).to(p.dtype)


def train_private(
    model: nn.Module,
    data: ArrayData,
    schedule: LocalSchedule,
    mechanism: PrivateSteps,
    *,
    randomness: SecureRandom,
) -> TrainOutcome:
    """DP-SGD over ``data`` as ``mechanism`` says, in place on ``model``.

    Which records each step samples and the noise it adds both come from ``randomness``, and
    nothing else random is used: with a fresh :class:`SecureRandom` no one but this process can
    predict them. ``schedule`` gives the learning rate, momentum and proximal pull; its batch
    size and epochs are not used (the mechanism fixes the steps).
    """
    ModuleValidator.validate(model, strict=True)
    private = GradSampleModule(model)
    optimizer = SecureNoiseOptimizer(
        torch.optim.SGD(model.parameters(), lr=schedule.learning_rate, momentum=schedule.momentum),
        std=mechanism.noise_multiplier * mechanism.max_grad_norm,
        max_grad_norm=mechanism.max_grad_norm,
        expected_batch_size=mechanism.sample_rate * len(data),
        randomness=randomness,
    )
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    batches = (
        torch.from_numpy(np.flatnonzero(randomness.bernoulli(len(data), mechanism.sample_rate)))
        for _ in range(mechanism.steps)
    )
    anchor = _anchor(model, schedule)
    loss, steps = _run_steps(
        private, optimizer, ((x[i], y[i]) for i in batches), schedule, anchor, model
    )
    private.to_standard_module()  # the hooks off: the model is used on afterwards
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainOutcome(state=state, loss=loss, steps=steps)


def train_plain(
    model: nn.Module, data: ArrayData, schedule: LocalSchedule, *, seed: int
) -> TrainOutcome:
    """Non-private SGD, for baselines: no clipping, no noise, no accounting."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=schedule.learning_rate, momentum=schedule.momentum
    )
    loader = _loader(data, schedule.batch_size, seed)
    batches = (batch for _ in range(schedule.epochs) for batch in loader)
    loss, steps = _run_steps(model, optimizer, batches, schedule, _anchor(model, schedule), model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainOutcome(state=state, loss=loss, steps=steps)


def _anchor(model: nn.Module, schedule: LocalSchedule) -> list[torch.Tensor] | None:
    if schedule.proximal_mu <= 0:
        return None
    return [p.detach().clone() for p in model.parameters()]


def _run_steps(
    trained: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    schedule: LocalSchedule,
    anchor: list[torch.Tensor] | None,
    base: nn.Module,
) -> tuple[float, int]:
    criterion = nn.CrossEntropyLoss()
    trained.train()
    total, count, steps = 0.0, 0, 0
    for x, y in batches:
        optimizer.zero_grad()
        output = trained(x)
        # Poisson sampling can draw an empty batch: it is still a (noised, accounted) step.
        loss = criterion(output, y) if len(y) else output.sum()
        with warnings.catch_warnings():
            # Opacus' hooks on a first layer whose input needs no gradient: expected.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        optimizer.step()
        if anchor is not None:
            _proximal_step(base, anchor, schedule.learning_rate * schedule.proximal_mu)
        total += loss.item() * len(y)
        count += len(y)
        steps += 1
    return (total / count if count else math.nan), steps


@torch.no_grad()
def _proximal_step(model: nn.Module, anchor: list[torch.Tensor], strength: float) -> None:
    """FedProx's pull towards the global weights, applied after the (private) step.

    The proximal term does not depend on any record, so applying its gradient outside the
    clipped, noised per-sample gradients is post-processing and costs no privacy.
    """
    for param, global_param in zip(model.parameters(), anchor, strict=True):
        param.sub_(strength * (param - global_param))
