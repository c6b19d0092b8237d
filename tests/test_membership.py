"""Membership inference: an overfit model leaks, an unrelated one does not, and a run's global
model is attacked with exactly the records its nodes trained on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedaiot.config.run import RunConfig
from fedaiot.experiments.membership import MembershipError, attack, attack_run
from fedaiot.node.round import simulated_federation
from fedaiot.registry.store import Manifest, ModelRegistry, NodePrivacy, RegistryError
from fedaiot.rounds.loop import RoundLoop
from fedaiot.simulation.inprocess import InProcessGrid
from fedaiot.tasks import ArrayData, federate, get_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # On a loaded machine torch's thread pool makes these tiny models 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> ArrayData:
    fed = federate(get_task("digits"), 1, partitioner="iid", seed=0)
    return fed.partitions[0]


def _take(data: ArrayData, start: int, stop: int) -> ArrayData:
    return ArrayData(x=data.x[start:stop], y=data.y[start:stop])


def _union(parts: list[ArrayData]) -> ArrayData:
    return ArrayData(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]))


def _overfit(data: ArrayData, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(steps):  # full batch: memorizes 100 records in a fraction of a second
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_an_overfit_model_leaks_membership(digits: ArrayData) -> None:
    members, non_members = _take(digits, 0, 100), _take(digits, 100, 200)
    model = _overfit(members)

    result = attack(model, members, non_members)

    assert result.member_accuracy == 1.0
    assert result.loss_auc > 0.65
    assert result.calibrated_auc > 0.65
    assert 0.5 < result.loss.balanced_accuracy <= 1.0
    assert 0.0 <= result.tpr_at_1pct_fpr <= 1.0
    assert model.training  # scoring put it in eval mode and back


def test_records_the_model_never_saw_are_not_told_apart(digits: ArrayData) -> None:
    model = _overfit(_take(digits, 0, 100))
    # neither side was trained on: any separation would be the attack's own bias
    result = attack(model, _take(digits, 100, 400), _take(digits, 400, 700))

    assert abs(result.loss_auc - 0.5) < 0.1
    assert abs(result.calibrated_auc - 0.5) < 0.1


def test_an_untrained_model_gives_chance(digits: ArrayData) -> None:
    torch.manual_seed(1)
    model = get_task("digits").build_model()
    result = attack(model, _take(digits, 0, 300), _take(digits, 300, 600))

    assert abs(result.loss_auc - 0.5) < 0.1
    assert abs(result.calibrated_auc - 0.5) < 0.1


class _Logits(nn.Module):
    """A "model" whose logits are its input: the test decides what the attacker sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_per_class_calibration_beats_one_loss_threshold() -> None:
    # Class 0 is easy and class 1 hard for members and non-members alike; within each class
    # members are a little more confident. One loss threshold mostly sorts by class.
    rng = np.random.default_rng(0)
    n = 400
    labels = np.repeat([0, 1], n // 2)
    base = np.where(labels == 0, 8.0, 1.0)

    def records(shift: float) -> ArrayData:
        margin = base + shift + rng.normal(scale=0.5, size=n)
        logits = np.stack([np.where(labels == 0, margin, 0), np.where(labels == 1, margin, 0)])
        return ArrayData(x=logits.T.astype(np.float32), y=labels.astype(np.int64))

    result = attack(_Logits(), records(1.0), records(0.0))

    assert result.calibrated_auc > 0.8
    assert result.calibrated_auc > result.loss_auc + 0.1


def test_unbalanced_inputs_are_balanced(digits: ArrayData) -> None:
    model = _overfit(_take(digits, 0, 100), steps=5)
    result = attack(model, _take(digits, 0, 300), _take(digits, 300, 350))
    assert (result.n_members, result.n_non_members) == (50, 50)

    capped = attack(model, _take(digits, 0, 300), _take(digits, 300, 600), max_examples=120)
    assert (capped.n_members, capped.n_non_members) == (120, 120)


def test_empty_inputs_are_refused(digits: ArrayData) -> None:
    model = _overfit(_take(digits, 0, 10), steps=1)
    with pytest.raises(MembershipError, match="0 non-members"):
        attack(model, _take(digits, 0, 10), _take(digits, 0, 0))
    with pytest.raises(MembershipError, match="0 members"):
        attack(model, _take(digits, 0, 0), _take(digits, 0, 10))
    with pytest.raises(MembershipError, match="max_examples"):
        attack(model, _take(digits, 0, 10), _take(digits, 10, 20), max_examples=0)


@pytest.mark.usefixtures("flower_identity")
def test_attack_run_on_a_coordinated_run(tmp_path: Path) -> None:
    cfg = RunConfig(
        task="breast-cancer",
        num_rounds=2,
        private=False,
        local_epochs=5,
        min_available_nodes=3,
        partitioner="iid",
        secure_aggregation=False,
        output_dir=str(tmp_path / "run"),
    )
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 3))

    result = attack_run(cfg.output_path)

    fed = simulated_federation(cfg, 3)
    members = _union(fed.partitions)
    weights, _ = ModelRegistry(cfg.output_path / "registry").load(f"{cfg.output_path.name}-r0002")
    model = get_task(cfg.task).build_model()
    model.load_state_dict(weights)
    assert result == attack(model, members, fed.test)
    assert result.n_members == len(fed.test)  # the held-out side is the smaller one
    assert result.member_accuracy > 0.8


def _register(root: Path, cfg: RunConfig, nodes: list[NodePrivacy]) -> nn.Module:
    torch.manual_seed(0)
    model = get_task(cfg.task).build_model()
    ModelRegistry(root).register(
        model.state_dict(),
        Manifest(
            version="run-r0001",
            run="run",
            task=cfg.task,
            architecture="mlp",
            input_schema={},
            round=1,
            metrics={"accuracy": 0.5, "loss": 1.0},
            nodes=nodes,
            config={**cfg.model_dump(), "fingerprint": cfg.fingerprint()},
            weights_sha256="",
            created=time.time(),
        ),
    )
    ModelRegistry(root).set_refs(latest="run-r0001")
    return model


def _node(index: int, rounds: int) -> NodePrivacy:
    return NodePrivacy(
        id=f"node-{index}",
        examples=None,
        epsilon=2.0,
        delta=1e-5,
        noise_multiplier=1.0,
        rounds=rounds,
    )


def test_attack_run_leaves_out_nodes_that_never_contributed(tmp_path: Path) -> None:
    cfg = RunConfig(task="digits", partitioner="iid", seed=3)
    model = _register(tmp_path / "registry", cfg, [_node(0, 1), _node(1, 0), _node(2, 1)])

    result = attack_run(tmp_path, version="run-r0001", seed=5)

    fed = simulated_federation(cfg, 3)
    members = _union([fed.partitions[0], fed.partitions[2]])
    assert result == attack(model, members, fed.test, seed=5)


def test_attack_run_refuses_tampered_weights_and_unknown_splits(tmp_path: Path) -> None:
    cfg = RunConfig(task="digits", partitioner="iid")
    _register(tmp_path / "a" / "registry", cfg, [_node(0, 1), _node(2, 1)])
    with pytest.raises(MembershipError, match="cannot be rebuilt"):
        attack_run(tmp_path / "a")

    _register(tmp_path / "b" / "registry", cfg, [_node(0, 1), _node(1, 1)])
    weights = tmp_path / "b" / "registry" / "versions" / "run-r0001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="hash mismatch"):
        attack_run(tmp_path / "b")
