"""Distributed DP: noise shares inside secure aggregation, played end to end in-process.

The attacker is the coordinator, with up to dp-collusion nodes: it sees the unmasked sum and
knows the colluders' own shares. What is left must be the target noise, no less.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.privacy.distributed import ShareGeometry, encode_share
from fedaiot.privacy.ledger import summarize
from fedaiot.privacy.randomness import SecureRandom
from fedaiot.rounds.loop import RoundLoop
from fedaiot.secagg.protocol import run_round_in_memory
from fedaiot.secure_rounds.wire import survivor_floor
from fedaiot.simulation.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def _cfg(tmp_path: Path, name: str, nodes: int, **overrides: Any) -> RunConfig:
    fields = {
        "task": "breast-cancer",
        "dp_mode": "distributed",
        "num_rounds": 3,
        "epsilon": 1.0,
        "sample_rate": 0.3,
        "learning_rate": 1.0,
        "min_available_nodes": nodes,
        "min_train_nodes": nodes,
    }
    return RunConfig(**{**fields, **overrides}, output_dir=str(tmp_path / name))


def test_the_noise_left_to_a_colluding_coordinator_is_the_target(tmp_path: Path) -> None:
    # Ten nodes, one drops out, two collude: the coordinator unmasks the sum of nine and
    # subtracts the two colluders' shares (it knows them). Seven honest shares remain.
    nodes, dropout, collusion, threshold, degree = 10, 0.1, 2, 3, 4  # as choose() picks for 10
    floor = survivor_floor(nodes, dropout, threshold)
    assert floor == 9
    honest = floor - collusion
    # a small geometry, so that the target variance is small enough to test its shape exactly
    geometry = ShareGeometry(dimension=20_000, clip=1.0, scale=2.0)
    sigma = 0.09  # target variance (sigma * l2)^2 = (0.09 * 143.4)^2, about 167
    target = (sigma * geometry.l2) ** 2
    variance = geometry.share_variance(sigma, honest)
    shares = {
        i: encode_share(np.zeros(geometry.dimension), geometry, variance, SecureRandom())
        for i in range(1, nodes + 1)
    }
    total, count = run_round_in_memory(
        shares,
        dict.fromkeys(shares, 1.0),
        threshold=threshold,
        degree=degree,
        drop_after_advert=[10],
        frac_bits=0,
        max_abs=2.0**52,
    )
    assert count == floor
    # exact integer arithmetic through the masks: the sum is the sum of the shares
    np.testing.assert_array_equal(total, sum(shares[i] for i in range(1, 10)))
    # zero gradients round to zero: what is left is noise; the colluders remove their own
    left = total - shares[1] - shares[2]
    assert abs(left.var() / target - 1) < 0.04  # 20,000 draws: sd of the ratio ~1 %
    assert abs(left.mean()) < 5 * math.sqrt(target / left.size)
    values, counts = np.unique(left.astype(np.int64), return_counts=True)
    expected = stats.skellam.pmf(values, target / 2, target / 2) * left.size
    keep = expected >= 5
    observed, wanted = counts[keep], expected[keep]
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4
    # the nine survivors' sum carries 9/7 of the target: more than needed, never less
    assert abs(total.var() / (target * 9 / 7) - 1) < 0.04


def test_a_distributed_run_trains_and_both_epsilons_hold_up(tmp_path: Path) -> None:
    from fedaiot.cli.ledger import ledger_verify

    cfg = _cfg(tmp_path, "ddp", 5)
    coordinator = RoundLoop(cfg)
    summary = coordinator.run_rounds(InProcessGrid(cfg, 5))
    assert summary["status"] == "completed" and summary["aggregated_rounds"] == 3
    nodes = {n["id"]: n for n in summary["nodes"]}
    for node in nodes.values():
        assert node["epsilon"] <= cfg.epsilon
        assert node["epsilon_local"] > node["epsilon"]  # its own share alone is less noise
        assert node["examples"] is None  # the count travelled inside the masked vector
    manifest = coordinator.registry.manifest(coordinator.registry.versions()[-1])
    assert manifest.privacy["dp_mode"] == "distributed"
    assert "at most 0 node(s) collude" in manifest.privacy["trust"]
    assert "epsilon-local" in manifest.privacy["coordinator_saw_per_node"]
    ledgers = sorted((cfg.output_path / "ledgers").rglob("ledger-*.json"))
    assert len(ledgers) == 5
    ledger = summarize(ledgers[0])
    assert ledger["skellam_history"][0][2] == 3  # three one-step rounds
    assert ledger["epsilon"] == pytest.approx(nodes["node-0"]["epsilon"], rel=1e-9)
    assert ledger["epsilon_local"] == pytest.approx(nodes["node-0"]["epsilon_local"], rel=1e-9)
    ledger_verify(ledgers)  # both epsilons against dp-accounting's own RDP: within 1 %


def test_a_round_below_the_survivor_floor_is_not_unmasked(tmp_path: Path) -> None:
    # five nodes, dropout tolerance 0.1: the floor is all five; one drops after sharing keys
    cfg = _cfg(tmp_path, "short", 5, num_rounds=1)
    dropped = {(4, "train.secagg"): None}
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=dropped))
    assert summary["status"] == "no-aggregate"
    events = [json.loads(x) for x in (cfg.output_path / "journal.jsonl").open()]
    error = next(e for e in events if e["event"] == "round")["secure_aggregation"]["error"]
    assert "sized for a sum of at least 5" in error  # no mask is revealed towards four
    # the same drop with a dropout tolerance of 0.2: a floor of four, and the round goes on
    tolerant = _cfg(tmp_path, "tolerant", 5, num_rounds=1, secagg_dropout=0.2)
    summary = RoundLoop(tolerant).run_rounds(InProcessGrid(tolerant, 5, overrides=dropped))
    assert summary["status"] == "completed"


def test_distributed_dp_without_secure_aggregation_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config({"dp-mode": "distributed", "secure-aggregation": False})
    assert "no distributed DP without it" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert RunConfig.from_run_config({"private": False, "dp-mode": "distributed"}).dp_mode == "off"


def test_nodes_refuse_to_unmask_a_small_sum_even_if_the_coordinator_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedaiot.secure_rounds.driver as driver

    # a coordinator that ignores the floor and asks for the unmasking of four shares
    monkeypatch.setattr(driver, "survivor_floor", lambda *args: 0)
    cfg = _cfg(tmp_path, "pushy", 5, num_rounds=1)
    dropped = {(4, "train.secagg"): None}
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=dropped))
    assert summary["status"] == "no-aggregate"
    events = [json.loads(x) for x in (cfg.output_path / "journal.jsonl").open()]
    secure = next(e for e in events if e["event"] == "round")["secure_aggregation"]
    assert "0 survivors sent their shares" in secure["error"]  # every honest node refused
    refused = [n for n, why in secure["dropped"].items() if "failed (protocol-error)" in why]
    assert sorted(refused) == ["node-0", "node-1", "node-2", "node-3"], secure["dropped"]


def test_the_gradient_sum_clips_every_record_to_the_norm() -> None:
    import torch

    from fedaiot.node.gradient_share import clipped_gradient_sum
    from fedaiot.tasks import ArrayData, get_task

    task = get_task("breast-cancer")
    torch.manual_seed(0)
    model = task.build_model()
    rng = np.random.default_rng(0)
    data = ArrayData(rng.normal(size=(40, 30)).astype(np.float32) * 3, rng.integers(0, 2, 40))
    clip = 0.05  # far below every record's gradient norm: every record is clipped
    got = clipped_gradient_sum(model, data, sample_rate=1.0, clip=clip, randomness=SecureRandom())
    expected = np.zeros_like(got)
    for x, y in zip(data.x, data.y, strict=True):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(x[None])), torch.tensor([y])
        )
        loss.backward()
        grad = np.concatenate(
            [dict(model.named_parameters())[k].grad.flatten().numpy() for k in model.state_dict()]
        ).astype(np.float64)
        assert np.linalg.norm(grad) > clip
        expected += grad * clip / np.linalg.norm(grad)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(got) <= 40 * clip  # the sum of forty clipped records
