"""Noise planning, accounting continuity across restarts, and the ledger's safety checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedaiot.privacy.accounting import (
    BudgetExhaustedError,
    epsilon_independent,
    epsilon_spent,
    plan_noise,
)
from fedaiot.privacy.ledger import LedgerError, PrivacyLedger

DELTA = 1e-5


def test_planned_noise_meets_the_budget_without_overshooting() -> None:
    sigma = plan_noise(target_epsilon=3.0, delta=DELTA, sample_rate=0.2, steps=75)
    spent = epsilon_spent([(sigma, 0.2, 75)], DELTA)
    assert spent <= 3.0
    assert spent > 3.0 * 0.99
    # a little less noise would overrun the budget
    assert epsilon_spent([(sigma * 0.98, 0.2, 75)], DELTA) > 3.0


def test_plan_accounts_for_what_was_already_spent() -> None:
    spent = [(3.0, 0.2, 40)]
    sigma = plan_noise(target_epsilon=3.0, delta=DELTA, sample_rate=0.2, steps=30, spent=spent)
    total = epsilon_spent([*spent, (sigma, 0.2, 30)], DELTA)
    assert 2.97 < total <= 3.0


def test_plan_refuses_a_spent_budget() -> None:
    with pytest.raises(BudgetExhaustedError, match="already spent"):
        plan_noise(
            target_epsilon=0.5, delta=DELTA, sample_rate=0.5, steps=10, spent=[(0.5, 0.5, 200)]
        )


def test_independent_recomputation_agrees_within_one_percent() -> None:
    history = [(1.1, 0.1, 50), (2.3, 0.25, 12), (0.9, 0.05, 300)]
    ours, theirs = epsilon_spent(history, DELTA), epsilon_independent(history, DELTA)
    assert math.isfinite(ours)
    assert abs(ours - theirs) / ours < 0.01


def test_cached_accounting_equals_opacus_accountant_exactly() -> None:
    """The per-step RDP cache changes the cost, never the number."""
    for history in ([(1.1, 0.1, 50)], [(1.1, 0.1, 50), (2.3, 0.25, 12), (1.1, 0.1, 7)]):
        reference = RDPAccountant()
        reference.history = list(history)
        for _ in range(2):  # the second call is served from the cache
            assert epsilon_spent(history, DELTA) == reference.get_epsilon(delta=DELTA)


def test_ledger_restored_between_rounds_equals_one_uninterrupted_accountant(tmp_path: Path) -> None:
    """k rounds with the accountant saved to disk and rebuilt each round == one accountant."""
    sigma, q, steps, rounds = 1.3, 0.125, 8, 5
    continuous = RDPAccountant()
    ledger = PrivacyLedger(tmp_path / "node.json", node="n", dataset="d" * 64)
    for _ in range(rounds):
        for _ in range(steps):
            continuous.step(noise_multiplier=sigma, sample_rate=q)
        restarted = RDPAccountant()  # a fresh process: only the ledger file survives
        restarted.history = list(ledger.read().history)
        for _ in range(steps):
            restarted.step(noise_multiplier=sigma, sample_rate=q)
        with ledger.update() as record:
            record.history = list(restarted.history)
        assert ledger.epsilon(DELTA) == pytest.approx(continuous.get_epsilon(DELTA), rel=1e-12)
    assert ledger.read().history == [(sigma, q, steps * rounds)]


def test_ledger_refuses_other_data_and_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    with PrivacyLedger(path, node="n", dataset="a" * 64).update() as record:
        record.history = [(1.0, 0.1, 10)]
    with pytest.raises(LedgerError, match="another data set"):
        PrivacyLedger(path, node="n", dataset="b" * 64).read()
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger(path, node="n", dataset="a" * 64).read()


def test_ledger_write_is_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    with PrivacyLedger(path, node="n", dataset="a" * 64).update() as record:
        record.history = [(1.0, 0.1, 10)]
    assert json.loads(path.read_text())["history"] == [[1.0, 0.1, 10]]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_sliver_of_budget_is_not_spent_on_pure_noise() -> None:
    spent = [(1.0, 0.2, 100)]
    nearly_all = epsilon_spent(spent, DELTA) + 0.001
    with pytest.raises(BudgetExhaustedError, match="cannot pay for 50 steps"):
        plan_noise(target_epsilon=nearly_all, delta=DELTA, sample_rate=0.2, steps=50, spent=spent)
