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
    plan_noise,
)
from fedaiot.privacy.distributed import ACCOUNTANT as DISTRIBUTED_ACCOUNTANT
from fedaiot.privacy.distributed import ShareGeometry, plan_sigma, releases_before_training
from fedaiot.privacy.ledger import (
    CountRelease,
    LedgerRecord,
    NoisePlan,
    PrivacyLedger,
    RoundEntry,
)
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.privacy.rdp import SkellamEntry


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
    run_epsilon: float = math.nan  # the run's own target, before the node's cap: what a
    # distributed run's shared noise is planned for (every node must add the same)
    before_training: tuple[HistoryEntry, ...] = ()  # what every node releases first

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
            rounds=cfg.planned_rounds,
            count_noise=cfg.count_noise,
            run_epsilon=cfg.epsilon,
            before_training=releases_before_training(cfg),
        )


@dataclass(frozen=True)
class Decision:
    """The budget's answer for one round: ``granted`` with the plan, or refused with why."""

    granted: bool
    epsilon: float  # after this round when granted, spent so far when refused
    plan: NoisePlan | None = None
    weight: float = 0.0  # the data set's noisy count: its weight in the average
    reason: str = ""
    local_epsilon: float = math.nan  # distributed rounds: this node's share alone


def decide(
    ledger: PrivacyLedger,
    terms: BudgetTerms,
    *,
    run: str,
    server_round: int,
    examples: int,
    randomness: SecureRandom,
    plan: NoisePlan | None = None,
) -> Decision:
    """Refund the run's abandoned charges, then plan and charge this round, or refuse it.

    ``plan`` imposes the run's noise (a newer cohort's plan, ``fedaiot.privacy.cohorts``)
    instead of planning it from this ledger's history; the round is charged as run.
    """
    imposed = plan
    with ledger.update() as record:
        _refund_abandoned(record, run, server_round)
        pending = _pending_charge(record, run, server_round)
        if pending and record.count is not None:
            return Decision(True, pending.epsilon, record.plans[run], record.count.value)
        count_step: list[HistoryEntry] = []
        if record.count is None:
            count_step = [(terms.count_noise, 1.0, 1)]
        before = [*record.history, *count_step]
        try:
            plan = imposed or record.plans.get(run) or _plan(terms, before, record.skellam_history)
        except BudgetExhaustedError as exc:
            return Decision(False, record.epsilon(terms.delta), reason=str(exc))
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        trial = record.model_copy()
        trial.history = with_step(before, step)
        after = trial.train_epsilon(terms.delta)
        if after > terms.epsilon:
            return Decision(
                False,
                record.epsilon(terms.delta),
                reason=(
                    f"privacy budget exhausted: this round would raise epsilon from "
                    f"{record.train_epsilon(terms.delta):.3f} to {after:.3f}, over the budget "
                    f"of {terms.epsilon:.3f} (delta {terms.delta:g})"
                ),
            )
        if record.count is None:
            noisy = round(examples + float(randomness.normal(1, terms.count_noise)[0]))
            record.count = CountRelease(value=max(1, noisy), noise=terms.count_noise, run=run)
        record.plans[run] = plan
        record.history = with_step(before, step)
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


def decide_distributed(
    ledger: PrivacyLedger,
    terms: BudgetTerms,
    *,
    run: str,
    server_round: int,
    examples: int,
    randomness: SecureRandom,
    geometry: ShareGeometry,
    honest: int,
) -> Decision:
    """As :func:`decide`, for a distributed round: one Skellam step whose noise multiplier is
    planned from the run's terms alone (every node adds the same share), charged with both its
    distributed epsilon (which the budget is held to) and its share-alone (local) epsilon."""
    with ledger.update() as record:
        _refund_abandoned(record, run, server_round)
        pending = _pending_charge(record, run, server_round)
        if pending and record.count is not None:
            return Decision(
                True, pending.epsilon, record.plans[run], record.count.value,
                local_epsilon=pending.local_epsilon or math.nan,
            )  # fmt: skip
        count_step: list[HistoryEntry] = [] if record.count else [(terms.count_noise, 1.0, 1)]
        try:
            plan = record.plans.get(run) or _plan_distributed(terms, geometry)
        except BudgetExhaustedError as exc:
            return Decision(False, record.epsilon(terms.delta), reason=str(exc))
        sigma, q = plan.noise_multiplier, plan.sample_rate
        share = sigma / math.sqrt(honest)
        after_record = record.model_copy(deep=True)
        after_record.history = [*record.history, *count_step]
        after_record.skellam_history = _with_entry(
            record.skellam_history, geometry.entry(sigma, q, 1)
        )
        after_record.share_history = _with_entry(record.share_history, geometry.entry(share, q, 1))
        after = after_record.train_epsilon(terms.delta)
        if after > terms.epsilon:
            return Decision(
                False,
                record.epsilon(terms.delta),
                reason=(
                    f"privacy budget exhausted: this distributed round would raise epsilon from "
                    f"{record.train_epsilon(terms.delta):.3f} to {after:.3f}, over the budget of "
                    f"{terms.epsilon:.3f} (delta {terms.delta:g})"
                ),
            )
        local = after_record.train_epsilon(terms.delta, shares_alone=True)
        if record.count is None:
            noisy = round(examples + float(randomness.normal(1, terms.count_noise)[0]))
            record.count = CountRelease(value=max(1, noisy), noise=terms.count_noise, run=run)
        record.plans[run] = plan
        record.history = after_record.history
        record.skellam_history = after_record.skellam_history
        record.share_history = after_record.share_history
        record.rounds.append(
            RoundEntry(
                run=run, round=server_round, noise_multiplier=sigma, sample_rate=q, steps=1,
                epsilon=after, delta=terms.delta, examples=examples, released=False,
                mode="distributed", l2=geometry.l2, l1=geometry.l1,
                share_noise_multiplier=share, local_epsilon=local,
            )
        )  # fmt: skip
        return Decision(True, record.epsilon(terms.delta), plan, record.count.value, "", local)


def _plan_distributed(terms: BudgetTerms, geometry: ShareGeometry) -> NoisePlan:
    target = terms.run_epsilon if math.isfinite(terms.run_epsilon) else terms.epsilon
    sigma = plan_sigma(
        epsilon=target,
        delta=terms.delta,
        sample_rate=terms.sample_rate,
        rounds=terms.rounds,
        geometry=geometry,
        before=terms.before_training or ((terms.count_noise, 1.0, 1),),
    )
    return NoisePlan(
        noise_multiplier=sigma,
        sample_rate=terms.sample_rate,
        steps_per_round=1,
        rounds=terms.rounds,
        target_epsilon=target,
        delta=terms.delta,
        accountant=DISTRIBUTED_ACCOUNTANT,
    )


@dataclass(frozen=True)
class PendingRelease:
    """A charged round whose update has not left the node yet: kept with the update (in
    Flower's ``Context.state`` between secure-aggregation stages) until it is sent. A round
    over several cohorts (``fedaiot.privacy.cohorts``) has one ledger per cohort."""

    ledgers: tuple[str, ...]
    datasets: tuple[str, ...]
    run: str
    round: int

    @classmethod
    def of(cls, ledgers: list[PrivacyLedger], run: str, server_round: int) -> PendingRelease:
        return cls(
            tuple(str(x.path) for x in ledgers),
            tuple(x.dataset for x in ledgers),
            run,
            server_round,
        )

    def to_record(self) -> dict[str, str | int | list[str]]:
        return {
            "ledgers": list(self.ledgers),
            "datasets": list(self.datasets),
            "run": self.run,
            "round": self.round,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> PendingRelease:
        ledgers, datasets = record["ledgers"], record["datasets"]
        if not isinstance(ledgers, list) or not isinstance(datasets, list):
            raise ValueError("a pending release names its ledgers and data sets in lists")
        return cls(
            tuple(str(x) for x in ledgers),
            tuple(str(x) for x in datasets),
            str(record["run"]),
            int(record["round"]),  # type: ignore[call-overload]
        )

    def release(self) -> None:
        for path, dataset in zip(self.ledgers, self.datasets, strict=True):
            ledger = PrivacyLedger(Path(path), dataset=dataset)
            mark_released(ledger, run=self.run, server_round=self.round)


def mark_released(ledger: PrivacyLedger, *, run: str, server_round: int) -> None:
    """The round's update is about to leave the node: its charge can never be returned."""
    with ledger.update() as record:
        for entry in record.rounds:
            if entry.run == run and entry.round == server_round and not entry.refunded:
                entry.released = True


def _plan(
    terms: BudgetTerms, spent: list[HistoryEntry], spent_skellam: list[SkellamEntry]
) -> NoisePlan:
    sigma = plan_noise(
        target_epsilon=terms.epsilon,
        delta=terms.delta,
        sample_rate=terms.sample_rate,
        steps=terms.steps_per_round * terms.rounds,
        spent=spent,
        spent_skellam=spent_skellam,
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


def _pending_charge(record: LedgerRecord, run: str, server_round: int) -> RoundEntry | None:
    """This round's charge under this run's plan, taken but not yet released: a round asked for
    again (a crashed handler, a retried message) trains under it instead of paying twice."""
    if run not in record.plans:
        return None
    pending = [
        e
        for e in record.rounds
        if e.run == run and e.round == server_round and not e.released and not e.refunded
    ]
    return pending[-1] if pending else None


def _refund_abandoned(record: LedgerRecord, run: str, server_round: int) -> None:
    for entry in record.rounds:
        if entry.run != run or entry.round == server_round or entry.released or entry.refunded:
            continue
        if entry.mode == "distributed":
            summed, alone = entry.skellam_steps()
            kept = _without_entry(record.skellam_history, summed)
            kept_alone = _without_entry(record.share_history, alone)
            if kept is not None and kept_alone is not None:
                record.skellam_history, record.share_history = kept, kept_alone
                entry.refunded = True
            continue
        step = (entry.noise_multiplier, entry.sample_rate, entry.steps)
        remaining = _without_step(record.history, step)
        if remaining is not None:  # a charge that cannot be found stays charged
            record.history = remaining
            entry.refunded = True


def with_step(history: list[HistoryEntry], step: HistoryEntry) -> list[HistoryEntry]:
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


def _with_entry(history: list[SkellamEntry], step: SkellamEntry) -> list[SkellamEntry]:
    """The Skellam history after ``step``, merged into the last entry of the same mechanism."""
    if history and _same_mechanism(history[-1], step):
        last = history[-1]
        return [*history[:-1], (last[0], last[1], last[2] + step[2], last[3], last[4])]
    return [*history, step]


def _without_entry(history: list[SkellamEntry], step: SkellamEntry) -> list[SkellamEntry] | None:
    for index in range(len(history) - 1, -1, -1):
        entry = history[index]
        if _same_mechanism(entry, step) and entry[2] >= step[2]:
            rest = [*history[:index], *history[index + 1 :]]
            if entry[2] > step[2]:
                rest.insert(index, (entry[0], entry[1], entry[2] - step[2], entry[3], entry[4]))
            return rest
    return None


def _same_mechanism(a: SkellamEntry, b: SkellamEntry) -> bool:
    return all(
        math.isclose(x, y)
        for x, y in zip((a[0], a[1], a[3], a[4]), (b[0], b[1], b[3], b[4]), strict=True)
    )
