"""A node's round: private training, the ledger across restarts, and budget refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedaiot.config import RunConfig
from fedaiot.node import train_round
from fedaiot.privacy.accounting import epsilon_spent
from fedaiot.privacy.ledger import LedgerError
from fedaiot.tasks import ArrayData, get_task

ROUNDS = 3


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig(
        task="breast-cancer",
        num_rounds=ROUNDS,
        epsilon=1.0,
        batch_size=16,
        output_dir=str(tmp_path),
    )


@pytest.fixture
def data() -> ArrayData:
    from fedaiot.node import simulated_partition

    return simulated_partition(RunConfig(task="breast-cancer"), 0, 3)


def _global(cfg: RunConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_task(cfg.task).build_model().state_dict()


def _round(cfg: RunConfig, data: ArrayData, ledger: Path, server_round: int, run_key: str = "r1"):
    return train_round(
        cfg,
        node="node-0",
        data=data,
        global_state=_global(cfg),
        server_round=server_round,
        run_key=run_key,
        ledger_path=ledger,
    )


def test_rounds_spend_the_planned_budget_and_the_next_is_refused(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    ledger = tmp_path / "node-0.json"
    epsilons = []
    for server_round in range(1, ROUNDS + 1):
        # every call builds everything afresh from the ledger file, as a restarted node does
        reply = _round(cfg, data, ledger, server_round)
        assert reply.status == "trained"
        assert reply.state is not None
        assert all(torch.isfinite(t).all() for t in reply.state.values())
        epsilons.append(reply.metrics["epsilon"])
    assert epsilons == sorted(epsilons)
    assert 0.97 * cfg.epsilon < epsilons[-1] <= cfg.epsilon

    # one uninterrupted accountant over the same steps gives the same epsilon
    sigma, q = reply.metrics["noise-multiplier"], reply.metrics["sample-rate"]
    steps = int(reply.metrics["steps"]) * ROUNDS
    assert _history(ledger) == [(sigma, q, steps)]
    assert epsilons[-1] == pytest.approx(epsilon_spent([(sigma, q, steps)], cfg.delta), rel=1e-9)

    before = ledger.read_bytes()
    refused = _round(cfg, data, ledger, ROUNDS + 1)
    assert refused.status == "refused"
    assert refused.state is None
    assert "privacy budget exhausted" in refused.reason
    assert refused.metrics["epsilon"] == pytest.approx(epsilons[-1])
    assert ledger.read_bytes() == before  # a refusal spends nothing


def test_a_new_run_over_the_same_data_goes_on_from_what_was_spent(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    ledger = tmp_path / "node-0.json"
    for server_round in range(1, ROUNDS + 1):
        _round(cfg, data, ledger, server_round)
    smaller = cfg.model_copy(update={"epsilon": 0.9})
    again = _round(smaller, data, ledger, 1, run_key="r2")
    assert again.status == "refused"
    assert "already spent" in again.reason

    bigger = cfg.model_copy(update={"epsilon": 2.0})
    spent_before = epsilon_spent(_history(ledger), cfg.delta)
    replies = [_round(bigger, data, ledger, r, run_key="r3") for r in range(1, ROUNDS + 1)]
    assert all(r.status == "trained" for r in replies)
    assert replies[0].metrics["epsilon"] > spent_before
    assert 1.9 < replies[-1].metrics["epsilon"] <= 2.0


def _history(ledger: Path) -> list[tuple[float, float, int]]:
    import json

    return [(float(s), float(q), int(n)) for s, q, n in json.loads(ledger.read_text())["history"]]


def test_a_ledger_of_other_data_is_refused(cfg: RunConfig, data: ArrayData, tmp_path: Path) -> None:
    ledger = tmp_path / "node-0.json"
    _round(cfg, data, ledger, 1)
    other = ArrayData(data.x[:-1].copy(), data.y[:-1].copy())
    with pytest.raises(LedgerError, match="another data set"):
        _round(cfg, other, ledger, 2)


def test_non_private_mode_trains_without_accounting(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    plain = cfg.model_copy(update={"private": False})
    reply = _round(plain, data, tmp_path / "node-0.json", 1)
    assert reply.status == "trained"
    assert math.isinf(reply.metrics["epsilon"])
    assert not (tmp_path / "node-0.json").exists()


def test_spend_written_by_another_party_between_rounds_is_kept_and_counted(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    from fedaiot.node import dataset_fingerprint
    from fedaiot.privacy.ledger import PrivacyLedger

    ledger = tmp_path / "node-0.json"
    _round(cfg, data, ledger, 1)
    other_study = (10.0, 0.2, 5)  # another run over the same data spends from the same budget
    shared = PrivacyLedger(ledger, node="node-0", dataset=dataset_fingerprint(data))
    with shared.update() as record:
        record.history.append(other_study)
    reply = _round(cfg, data, ledger, 2)
    assert reply.status == "trained"
    assert other_study in _history(ledger)  # not overwritten by the node's own accounting
    assert reply.metrics["epsilon"] == pytest.approx(epsilon_spent(_history(ledger), cfg.delta))

    with shared.update() as record:  # now the other study spends nearly all that is left
        record.history.append((0.8, 1.0, 10))
    refused = _round(cfg, data, ledger, 3)
    assert refused.status == "refused"
    assert "privacy budget exhausted" in refused.reason


def test_a_round_asked_again_is_answered_with_the_same_update_at_no_new_cost(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    ledger = tmp_path / "node-0.json"
    first = _round(cfg, data, ledger, 1)
    before = ledger.read_bytes()
    again = _round(cfg, data, ledger, 1)  # a restarted coordinator asks for round 1 again
    assert again.status == "trained" and again.state is not None and first.state is not None
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    assert again.metrics["epsilon"] == first.metrics["epsilon"]
    assert ledger.read_bytes() == before  # nothing new released, nothing charged

    other_global = {k: v + 0.01 for k, v in _global(cfg).items()}
    changed = train_round(
        cfg,
        node="node-0",
        data=data,
        global_state=other_global,
        server_round=1,
        run_key="r1",
        ledger_path=ledger,
    )
    # an update of round 1 from another model is a new release: it is charged again
    assert changed.status == "trained"
    assert changed.metrics["epsilon"] > first.metrics["epsilon"]
    assert len(json.loads(ledger.read_text())["rounds"]) == 2


def test_a_node_that_crashed_while_training_retries_under_the_same_charge(
    cfg: RunConfig, data: ArrayData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedaiot.node

    ledger = tmp_path / "node-0.json"
    real = fedaiot.node.train_private

    def crash(*args: object, **kwargs: object) -> None:
        raise MemoryError("killed mid-round")

    monkeypatch.setattr(fedaiot.node, "train_private", crash)
    with pytest.raises(MemoryError):
        _round(cfg, data, ledger, 1)
    charged = json.loads(ledger.read_text())
    assert len(charged["rounds"]) == 1  # paid before training

    monkeypatch.setattr(fedaiot.node, "train_private", real)
    reply = _round(cfg, data, ledger, 1)
    assert reply.status == "trained"
    after = json.loads(ledger.read_text())
    assert after["rounds"] == charged["rounds"] and after["history"] == charged["history"]
