"""Releases other than training rounds: a study's feature statistics (training records) and
its federated evaluations (the held-out test records), charged to their side of the ledger
before they are computed, under the same lock and rules as rounds (``privacy.budget``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedaiot.privacy.accounting import ACCOUNTANT, BudgetExhaustedError, epsilon_spent, plan_noise
from fedaiot.privacy.budget import BudgetTerms, Decision, with_step
from fedaiot.privacy.cohorts import Cohort
from fedaiot.privacy.ledger import NoisePlan, PrivacyLedger, ReleaseEntry


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
        trial = record.model_copy()
        trial.history = with_step(history, step)
        # the training side composes with any distributed rounds; the test side never trains
        after = (
            epsilon_spent(trial.history, terms.delta) if test else trial.train_epsilon(terms.delta)
        )
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
            record.test_history = with_step(history, step)
        else:
            record.history = with_step(history, step)
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
class CohortRelease:
    """A release charged over a node's cohorts: which could pay, and the largest epsilon."""

    charged: list[Cohort]
    epsilon: float
    reason: str = ""

    @property
    def granted(self) -> bool:
        return bool(self.charged)

    def rows(self) -> np.ndarray:
        if not self.charged:
            return np.empty(0, np.int64)
        return np.sort(np.concatenate([c.rows for c in self.charged]))


def charge_cohorts(
    cohorts: list[Cohort], terms: BudgetTerms, *, run: str, release: Release
) -> CohortRelease:
    """Charge ``release`` to every cohort that can pay for it; the release then covers only
    those cohorts' records (the others sit it out)."""
    decisions = [(c, charge_release(c.ledger, terms, run=run, release=release)) for c in cohorts]
    charged = [c for c, d in decisions if d.granted]
    epsilon = max((d.epsilon for _, d in decisions), default=0.0)
    reasons = [d.reason for _, d in decisions if not d.granted]
    return CohortRelease(charged, epsilon, "" if charged else (reasons[0] if reasons else ""))


def cohort_evaluation_noise(
    cohorts: list[Cohort], terms: BudgetTerms, *, run: str, releases: int
) -> float:
    """One noise for a run's evaluations over all cohorts: the largest any cohort planned (more
    noise protects every cohort at least as well as its own plan). BudgetExhaustedError when
    no cohort can plan one."""
    sigmas = []
    for cohort in cohorts:
        try:
            sigmas.append(evaluation_noise(cohort.ledger, terms, run=run, releases=releases))
        except BudgetExhaustedError:
            continue
    if not sigmas:
        raise BudgetExhaustedError("no cohort of this node's test records has budget left")
    return max(sigmas)
