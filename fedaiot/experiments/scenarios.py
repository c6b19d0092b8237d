"""Operational scenarios that need more than a fault rate: a budget taken by another study.

An institution's ledger is shared by every study over its data. When another study spends what
is left while this run goes on, the node must refuse its next round, and the run must carry on
without it. The sweep plays that by spending from the node's real ledger file, under its lock,
exactly as a second run over the same data would.
"""

from __future__ import annotations

from pathlib import Path

from fedaiot.privacy.accounting import epsilon_spent
from fedaiot.privacy.ledger import LedgerRecord, PrivacyLedger

# A fine-grained mechanism (each step adds ~1e-4 epsilon), so the spend lands just under budget.
_OTHER_STUDY = (2.0, 0.01)


def spend_elsewhere(
    ledger_path: Path, *, budget: float, delta: float, leave: float = 0.002
) -> float:
    """Spend from the node's ledger until ``budget - leave`` is used; returns epsilon after.

    ``leave`` must be below what one round of the run costs, so that the node's next round
    goes over the budget and is refused.
    """
    record = LedgerRecord.model_validate_json(Path(ledger_path).read_bytes())
    ledger = PrivacyLedger(ledger_path, dataset=record.dataset)
    with ledger.update() as current:
        target = budget - leave
        low, high = 0, 1
        while epsilon_spent([*current.history, (*_OTHER_STUDY, high)], delta) < target:
            low, high = high, high * 2
        while high - low > 1:  # the largest number of steps that stays at or under the target
            middle = (low + high) // 2
            spent = epsilon_spent([*current.history, (*_OTHER_STUDY, middle)], delta)
            low, high = (middle, high) if spent <= target else (low, middle)
        if low:
            current.history = [*current.history, (*_OTHER_STUDY, low)]
        return epsilon_spent(current.history, delta)
