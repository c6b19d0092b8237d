"""A node's budget rules: plan a run's noise, charge a round before training, return what was
never released.

The rules, each kept under the ledger's lock so that two runs over one data set can never both
pass a check with the same remaining budget:

* **Plan once per run.** The noise multiplier is planned at a run's first round for all its
  rounds, from quantities the coordinator sets for every node (sampling rate, steps per round,
  rounds) and the history already spent: never from the data set's size, so the noise
  multiplier and epsilon a node reports say nothing about how many records it holds.
* **One noisy count per data set.** The first plan also releases the data set's size with
  Gaussian noise (sensitivity 1) and charges it; every later round and run reuses that same
  value as the node's weight in the average. Differences of aggregated weights across rounds
  therefore reveal at most this noisy count.
* **Charge before training.** A round is written into the ledger, unreleased, before any record
  is touched; a round that would go over the budget is refused and nothing is written.
* **Never the same update twice.** A round asked for again whose charge was released (its
  update left the node) is trained afresh under a new charge, or refused. A round asked for
  again whose charge was never released (the node crashed, or the round was abandoned before
  the update left) runs under that charge: there is still at most one release for it.
* **Return what was never released.** When a later round of the same run arrives, charges of
  that run that were never released are returned (marked refunded, their steps taken out of
  the history): nothing computed from them ever left the node. The caller must have discarded
  any update it still held for those rounds before asking (see ``fedaiot.secure_rounds.handlers``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedaiot.config.run import RunConfig
from fedaiot.privacy.accounting import (
    ACCOUNTANT,
    BudgetExhaustedError,
    HistoryEntry,
    epsilon_spent,
    plan_noise,
)
from fedaiot.privacy.ledger import (
    CountRelease,
    LedgerRecord,
    NoisePlan,
    PrivacyLedger,
    ReleaseEntry,
    RoundEntry,
)
from fedaiot.privacy.randomness import SecureRandom


@dataclass(frozen=True)
class BudgetTerms:
    """What a run asks of every node's budget; all of it set by the coordinator (and the
    node's own cap on epsilon), none of it derived from a node's data."""

    epsilon: float
    delta: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    count_noise: float

    @classmethod
    def for_run(cls, cfg: RunConfig, cap: float | None = None) -> BudgetTerms:
        """The run's terms; the node's own lifetime ``cap`` can lower its epsilon, never raise
        it (the coordinator cannot overrule an institution's cap)."""
        epsilon = cfg.epsilon if cap is None else min(cfg.epsilon, cap)
        return cls(
            epsilon=epsilon,
            delta=cfg.delta,
            sample_rate=cfg.sample_rate,
            steps_per_round=cfg.steps_per_round,
            rounds=cfg.num_rounds,
            count_noise=cfg.count_noise,
        )


@dataclass(frozen=True)
class Decision:
    """The budget's answer for one round: ``granted`` with the plan, or refused with why."""

    granted: bool
    epsilon: float  # after this round when granted, spent so far when refused
    plan: NoisePlan | None = None
    weight: float = 0.0  # the data set's noisy count: its weight in the average
    reason: str = ""


def decide(
    ledger: PrivacyLedger,
    terms: BudgetTerms,
    *,
    run: str,
    server_round: int,
    examples: int,
    randomness: SecureRandom,
) -> Decision:
    """Refund the run's abandoned charges, then plan and charge this round, or refuse it."""
    with ledger.update() as record:
        _refund_abandoned(record, run, server_round)
        pending = [
            e
            for e in record.rounds
            if e.run == run and e.round == server_round and not e.released and not e.refunded
        ]
        if pending and run in record.plans and record.count is not None:
            return Decision(True, pending[-1].epsilon, record.plans[run], record.count.value)
        count_step: list[HistoryEntry] = []
        if record.count is None:
            count_step = [(terms.count_noise, 1.0, 1)]
        try:
            plan = record.plans.get(run) or _plan(terms, [*record.history, *count_step])
        except BudgetExhaustedError as exc:
            return Decision(False, record.epsilon(terms.delta), reason=str(exc))
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        before = [*record.history, *count_step]
        after = epsilon_spent(_with_step(before, step), terms.delta)
        if after > terms.epsilon:
            return Decision(
                False,
                record.epsilon(terms.delta),
                reason=(
                    f"privacy budget exhausted: this round would raise epsilon from "
                    f"{epsilon_spent(before, terms.delta):.3f} to {after:.3f}, over the budget "
                    f"of {terms.epsilon:.3f} (delta {terms.delta:g})"
                ),
            )
        if record.count is None:
            noisy = round(examples + float(randomness.normal(1, terms.count_noise)[0]))
            record.count = CountRelease(value=max(1, noisy), noise=terms.count_noise, run=run)
        record.plans[run] = plan
        record.history = _with_step(before, step)
        record.rounds.append(
            RoundEntry(
                run=run,
                round=server_round,
                noise_multiplier=step[0],
                sample_rate=step[1],
                steps=step[2],
                epsilon=after,
                delta=terms.delta,
                examples=examples,
                released=False,
            )
        )
        return Decision(True, record.epsilon(terms.delta), plan, record.count.value)


@dataclass(frozen=True)
class Release:
    """A release other than training: a sum of per-record contributions of L2 norm at most 1
    with Gaussian noise of ``noise_multiplier`` (the history entry ``(sigma, 1.0, 1)``), over
    the training records (``side = "train"``) or the held-out test split (``"test"``)."""

    kind: str
    side: str
    noise_multiplier: float


def charge_release(
    ledger: PrivacyLedger, terms: BudgetTerms, *, run: str, release: Release
) -> Decision:
    """Charge ``release`` to its side of the ledger before it is computed, or refuse it."""
    with ledger.update() as record:
        test = release.side == "test"
        history = record.test_history if test else record.history
        step = (release.noise_multiplier, 1.0, 1)
        after = epsilon_spent(_with_step(history, step), terms.delta)
        if after > terms.epsilon:
            return Decision(
                False,
                record.epsilon(terms.delta),
                reason=(
                    f"privacy budget exhausted: the {release.kind} release would raise the "
                    f"{release.side} side's epsilon to {after:.3f}, over {terms.epsilon:.3f}"
                ),
            )
        if test:
            record.test_history = _with_step(history, step)
        else:
            record.history = _with_step(history, step)
        record.releases.append(
            ReleaseEntry(
                run=run,
                kind=release.kind,
                side=release.side,
                noise_multiplier=release.noise_multiplier,
                epsilon=after,
            )
        )
        return Decision(True, record.epsilon(terms.delta))


def evaluation_noise(
    ledger: PrivacyLedger, terms: BudgetTerms, *, run: str, releases: int
) -> float:
    """The noise of a run's evaluation releases, planned once so that ``releases`` of them
    fit the test split's budget; BudgetExhaustedError when they cannot."""
    key = f"{run}#evaluation"
    with ledger.update() as record:
        if key not in record.plans:
            sigma = plan_noise(
                target_epsilon=terms.epsilon,
                delta=terms.delta,
                sample_rate=1.0,
                steps=releases,
                spent=record.test_history,
            )
            record.plans[key] = NoisePlan(
                noise_multiplier=sigma,
                sample_rate=1.0,
                steps_per_round=1,
                rounds=releases,
                target_epsilon=terms.epsilon,
                delta=terms.delta,
                accountant=ACCOUNTANT,
            )
        return record.plans[key].noise_multiplier


@dataclass(frozen=True)
class PendingRelease:
    """A charged round whose update has not left the node yet: kept with the update (in
    Flower's ``Context.state`` between secure-aggregation stages) until it is sent."""

    ledger: str
    dataset: str
    run: str
    round: int

    def to_record(self) -> dict[str, str | int]:
        return {
            "ledger": self.ledger,
            "dataset": self.dataset,
            "run": self.run,
            "round": self.round,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> PendingRelease:
        return cls(
            str(record["ledger"]),
            str(record["dataset"]),
            str(record["run"]),
            int(record["round"]),  # type: ignore[call-overload]
        )

    def release(self) -> None:
        ledger = PrivacyLedger(Path(self.ledger), dataset=self.dataset)
        mark_released(ledger, run=self.run, server_round=self.round)


def mark_released(ledger: PrivacyLedger, *, run: str, server_round: int) -> None:
    """The round's update is about to leave the node: its charge can never be returned."""
    with ledger.update() as record:
        for entry in record.rounds:
            if entry.run == run and entry.round == server_round and not entry.refunded:
                entry.released = True


def _plan(terms: BudgetTerms, spent: list[HistoryEntry]) -> NoisePlan:
    sigma = plan_noise(
        target_epsilon=terms.epsilon,
        delta=terms.delta,
        sample_rate=terms.sample_rate,
        steps=terms.steps_per_round * terms.rounds,
        spent=spent,
    )
    return NoisePlan(
        noise_multiplier=sigma,
        sample_rate=terms.sample_rate,
        steps_per_round=terms.steps_per_round,
        rounds=terms.rounds,
        target_epsilon=terms.epsilon,
        delta=terms.delta,
        accountant=ACCOUNTANT,
    )


def _refund_abandoned(record: LedgerRecord, run: str, server_round: int) -> None:
    for entry in record.rounds:
        if entry.run != run or entry.round == server_round or entry.released or entry.refunded:
            continue
        step = (entry.noise_multiplier, entry.sample_rate, entry.steps)
        remaining = _without_step(record.history, step)
        if remaining is not None:  # a charge that cannot be found stays charged
            record.history = remaining
            entry.refunded = True


def _with_step(history: list[HistoryEntry], step: HistoryEntry) -> list[HistoryEntry]:
    """The history after ``step``, merged into the last entry as Opacus' accountant does."""
    if history and history[-1][:2] == step[:2]:
        return [*history[:-1], (step[0], step[1], history[-1][2] + step[2])]
    return [*history, step]


def _without_step(history: list[HistoryEntry], step: HistoryEntry) -> list[HistoryEntry] | None:
    """The history with ``step``'s steps taken out of the last entry of the same mechanism
    (composition commutes, so where they came from does not matter)."""
    for index in range(len(history) - 1, -1, -1):
        sigma, q, steps = history[index]
        if math.isclose(sigma, step[0]) and math.isclose(q, step[1]) and steps >= step[2]:
            left = steps - step[2]
            rest = [*history[:index], *history[index + 1 :]]
            if left:
                rest.insert(index, (sigma, q, left))
            return rest
    return None
