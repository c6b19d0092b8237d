"""A node's round: private training with noise no one else can predict, one budget per data
set whatever the node's name, a rerun round trained afresh, and refusal before overrun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.node.round import simulated_partition, train_round
from fedaiot.privacy.accounting import epsilon_spent
from fedaiot.privacy.ledger import PrivacyLedger, dataset_fingerprint, ledger_path
from fedaiot.tasks import ArrayData, get_task
from fedaiot.wire.replies import NodeReply

ROUNDS = 3


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig(task="breast-cancer", num_rounds=ROUNDS, epsilon=1.0, output_dir=str(tmp_path))


@pytest.fixture
def data() -> ArrayData:
    return simulated_partition(RunConfig(task="breast-cancer"), 0, 3)


def _global(cfg: RunConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_task(cfg.task).build_model().state_dict()


def _round(
    cfg: RunConfig,
    data: ArrayData,
    folder: Path,
    server_round: int,
    run_key: str = "r1",
    node: str = "node-0",
) -> NodeReply:
    return train_round(
        cfg,
        node=node,
        data=data,
        global_state=_global(cfg),
        server_round=server_round,
        run_key=run_key,
        ledger_dir=folder,
    )


def _ledger(folder: Path, data: ArrayData) -> dict:
    return json.loads(ledger_path(folder, dataset_fingerprint(data)).read_text())


def _history(folder: Path, data: ArrayData) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in _ledger(folder, data)["history"]]


def _differ(a: NodeReply, b: NodeReply) -> bool:
    assert a.state is not None and b.state is not None
    return any(not torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_rounds_spend_the_planned_budget_and_the_next_is_refused(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    epsilons = []
    for server_round in range(1, ROUNDS + 1):
        # every call builds everything afresh from the ledger file, as a restarted node does
        reply = _round(cfg, data, tmp_path, server_round)
        assert reply.status == "trained"
        assert reply.state is not None
        assert all(torch.isfinite(t).all() for t in reply.state.values())
        epsilons.append(reply.metrics["epsilon"])
    assert epsilons == sorted(epsilons)
    assert 0.97 * cfg.epsilon < epsilons[-1] <= cfg.epsilon

    # the count released once, then one mechanism for every step of the run
    sigma = reply.metrics["noise-multiplier"]
    steps = cfg.steps_per_round * ROUNDS
    assert _history(tmp_path, data) == [(cfg.count_noise, 1.0, 1), (sigma, cfg.sample_rate, steps)]
    assert epsilons[-1] == pytest.approx(epsilon_spent(_history(tmp_path, data), cfg.delta))

    before = _ledger(tmp_path, data)
    refused = _round(cfg, data, tmp_path, ROUNDS + 1)
    assert refused.status == "refused"
    assert refused.state is None
    assert refused.reason == "budget-exhausted"
    assert "privacy budget exhausted" in refused.detail
    assert refused.metrics["epsilon"] == pytest.approx(epsilons[-1])
    assert _ledger(tmp_path, data) == before  # a refusal spends nothing


def test_a_new_run_over_the_same_data_goes_on_from_what_was_spent(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    for server_round in range(1, ROUNDS + 1):
        _round(cfg, data, tmp_path, server_round)
    smaller = cfg.model_copy(update={"epsilon": 0.9})
    again = _round(smaller, data, tmp_path, 1, run_key="r2")
    assert again.status == "refused"
    assert "already spent" in again.detail

    bigger = cfg.model_copy(update={"epsilon": 2.0})
    spent_before = epsilon_spent(_history(tmp_path, data), cfg.delta)
    replies = [_round(bigger, data, tmp_path, r, run_key="r3") for r in range(1, ROUNDS + 1)]
    assert all(r.status == "trained" for r in replies)
    assert replies[0].metrics["epsilon"] > spent_before
    assert 1.9 < replies[-1].metrics["epsilon"] <= 2.0
    # the data set's size was released once, for both runs
    assert [h for h in _history(tmp_path, data) if h[1] == 1.0] == [(cfg.count_noise, 1.0, 1)]
    assert replies[0].weight == _ledger(tmp_path, data)["count"]["value"]


def test_identical_rounds_give_different_updates(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    """Same config, data, model, round and node name: the noise and sampling still differ."""
    first = _round(cfg, data, tmp_path / "a", 1)
    second = _round(cfg, data, tmp_path / "b", 1)
    assert _differ(first, second)


def test_nothing_in_the_run_config_changes_the_noise(
    cfg: RunConfig, data: ArrayData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the OS's randomness held fixed, every seed and name gives the very same update:
    the noise depends on nothing the coordinator chooses."""
    import os

    monkeypatch.setattr(os, "urandom", lambda n: bytes(range(n)))
    replies = [
        _round(cfg.model_copy(update={"seed": seed}), data, tmp_path / str(seed), 1, node=name)
        for seed, name in ((1, "node-0"), (2, "node-7"), (99, "alpha"))
    ]
    assert not _differ(replies[0], replies[1])
    assert not _differ(replies[0], replies[2])


def test_seeded_noise_is_reproducible_and_only_for_research(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    seeded = cfg.model_copy(update={"seeded_noise": True})
    first = _round(seeded, data, tmp_path / "a", 1)
    again = _round(seeded, data, tmp_path / "b", 1)
    other = _round(seeded.model_copy(update={"seed": 7}), data, tmp_path / "c", 1)
    assert not _differ(first, again)  # anyone with the seed recomputes the noise exactly
    assert _differ(first, other)

    from fedaiot.privacy.disclosure import disclosure

    assert disclosure(seeded)["private"] is False
    assert "NOT PRIVATE" in disclosure(seeded)["noise"]
    assert disclosure(cfg)["private"] is True


def test_a_round_asked_again_after_its_update_left_is_trained_afresh_and_charged(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    first = _round(cfg, data, tmp_path, 1)
    again = _round(cfg, data, tmp_path, 1)  # a restarted coordinator asks for round 1 again
    assert again.status == "trained"
    assert _differ(first, again)  # never the update already sent, so no sum can isolate it
    assert again.metrics["epsilon"] > first.metrics["epsilon"]
    assert [e["round"] for e in _ledger(tmp_path, data)["rounds"]] == [1, 1]


def test_a_node_that_crashed_while_training_retries_under_the_same_charge(
    cfg: RunConfig, data: ArrayData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedaiot.node.round

    real = fedaiot.node.round.train_private

    def crash(*args: object, **kwargs: object) -> None:
        raise MemoryError("killed mid-round")

    monkeypatch.setattr(fedaiot.node.round, "train_private", crash)
    with pytest.raises(MemoryError):
        _round(cfg, data, tmp_path, 1)
    charged = _ledger(tmp_path, data)
    assert len(charged["rounds"]) == 1  # paid before training
    assert charged["rounds"][0]["released"] is False

    monkeypatch.setattr(fedaiot.node.round, "train_private", real)
    reply = _round(cfg, data, tmp_path, 1)
    assert reply.status == "trained"
    after = _ledger(tmp_path, data)
    assert after["history"] == charged["history"]  # one release, one charge
    assert [e["released"] for e in after["rounds"]] == [True]


def test_a_charge_never_released_is_returned_at_the_next_round(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    """Round 1 trained but its update never left (the secure round was abandoned before the
    mask stage): asked for round 2, the node returns round 1's charge."""
    held = train_round(
        cfg,
        node="node-0",
        data=data,
        global_state=_global(cfg),
        server_round=1,
        run_key="r1",
        ledger_dir=tmp_path,
        released_on_return=False,
    )
    assert held.pending is not None
    one_round = epsilon_spent(_history(tmp_path, data), cfg.delta)
    second = _round(cfg, data, tmp_path, 2)
    assert second.metrics["epsilon"] == pytest.approx(one_round)
    rounds = _ledger(tmp_path, data)["rounds"]
    assert [(e["round"], e["refunded"], e["released"]) for e in rounds] == [
        (1, True, False),
        (2, False, True),
    ]


def test_spend_written_by_another_party_between_rounds_is_kept_and_counted(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    _round(cfg, data, tmp_path, 1)
    other_study = (10.0, 0.2, 5)  # another run over the same data spends from the same budget
    shared = PrivacyLedger(
        ledger_path(tmp_path, dataset_fingerprint(data)), dataset=dataset_fingerprint(data)
    )
    with shared.update() as record:
        record.history.append(other_study)
    reply = _round(cfg, data, tmp_path, 2)
    assert reply.status == "trained"
    assert other_study in _history(tmp_path, data)  # not overwritten by the node's accounting
    assert reply.metrics["epsilon"] == pytest.approx(
        epsilon_spent(_history(tmp_path, data), cfg.delta)
    )
    with shared.update() as record:  # now the other study spends nearly all that is left
        record.history.append((0.8, 1.0, 10))
    refused = _round(cfg, data, tmp_path, 3)
    assert refused.status == "refused"
    assert "privacy budget exhausted" in refused.detail


def test_another_name_or_record_order_draws_on_the_same_budget(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    for server_round in range(1, ROUNDS + 1):
        assert _round(cfg, data, tmp_path, server_round, node="alpha").status == "trained"
    shuffled = ArrayData(data.x[::-1].copy(), data.y[::-1].copy())
    renamed = _round(cfg, shuffled, tmp_path, 1, run_key="r2", node="beta")
    assert renamed.status == "refused"
    assert len(list(tmp_path.glob("ledger-*.json"))) == 1


def test_non_private_mode_trains_without_accounting(
    cfg: RunConfig, data: ArrayData, tmp_path: Path
) -> None:
    plain = cfg.model_copy(update={"private": False})
    reply = _round(plain, data, tmp_path, 1)
    assert reply.status == "trained"
    assert math.isinf(reply.metrics["epsilon"])
    assert not list(tmp_path.glob("ledger-*.json"))


def test_the_noise_multiplier_depends_on_the_budget_not_on_the_data_size(
    cfg: RunConfig, tmp_path: Path
) -> None:
    iid = RunConfig(task="breast-cancer", partitioner="iid")
    small, large = simulated_partition(iid, 0, 5), simulated_partition(iid, 0, 2)
    assert len(small) * 2 < len(large)
    # two institutions, each with its own ledger folder (the partitions share records)
    a, b = _round(cfg, small, tmp_path / "a", 1), _round(cfg, large, tmp_path / "b", 1)
    assert a.metrics["noise-multiplier"] == b.metrics["noise-multiplier"]
    assert a.metrics["epsilon"] == b.metrics["epsilon"]


def test_an_update_larger_than_the_bound_is_scaled_down_to_it() -> None:
    from fedaiot.node.round import bound_update

    start = {"w": torch.zeros(3), "b": torch.zeros(1)}
    small = {"w": torch.tensor([0.3, 0.0, 0.4]), "b": torch.zeros(1)}
    assert bound_update(start, small, 1.0) is small  # within the bound: untouched
    huge = {"w": torch.tensor([3e6, 0.0, 4e6]), "b": torch.zeros(1)}
    bounded = bound_update(start, huge, 10.0)
    assert torch.allclose(bounded["w"], torch.tensor([6.0, 0.0, 8.0]))
    assert bounded["w"].dtype == torch.float32
