"""Registry round-trip, refs, and refusal of corrupt or tampered files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fedaiot.registry.store import Manifest, ModelRegistry, RegistryError, version_name
from tests.waiting import run_together


def _manifest(version: str, accuracy: float = 0.9) -> Manifest:
    return Manifest(
        version=version,
        run="run",
        task="digits",
        architecture="mlp",
        input_schema={"shape": [64]},
        round=int(version.rsplit("-r", 1)[1]),
        metrics={"accuracy": accuracy, "loss": 0.3},
        config={"task": "digits"},
        weights_sha256="",
        created=time.time(),
    )


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}


def test_round_trip_keeps_weights_and_manifest(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    state = _state()
    written = registry.register(state, _manifest(version_name("run", 1)))
    loaded, manifest = registry.load("run-r0001")
    assert manifest == written
    assert len(manifest.weights_sha256) == 64
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor)


def test_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.register(_state(), _manifest("run-r0001"))
    before = (tmp_path / "versions/run-r0001/model.safetensors").read_bytes()
    with pytest.raises(RegistryError, match="already exists"):
        registry.register({"layer.weight": torch.zeros(4, 3)}, _manifest("run-r0001"))
    assert (tmp_path / "versions/run-r0001/model.safetensors").read_bytes() == before
    assert registry.versions() == ["run-r0001"]


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.register(_state(), _manifest("run-r0001"))
    weights = tmp_path / "versions/run-r0001/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="hash mismatch"):
        registry.load("run-r0001")


def test_corrupt_manifest_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.register(_state(), _manifest("run-r0001"))
    (tmp_path / "versions/run-r0001/manifest.json").write_text('{"version": 3')
    with pytest.raises(RegistryError, match="corrupt manifest"):
        registry.load("run-r0001")


def test_refs_mark_versions_and_refuse_missing_ones(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    registry.register(_state(), _manifest("run-r0001"))
    registry.register(_state(), _manifest("run-r0002"))
    registry.set_refs(latest="run-r0002", best="run-r0001")
    registry.set_refs(latest="run-r0002")
    assert registry.refs() == {"latest": "run-r0002", "best": "run-r0001"}
    with pytest.raises(RegistryError, match="not found"):
        registry.set_refs(best="run-r0009")
    assert registry.versions(run="run") == ["run-r0001", "run-r0002"]
    assert registry.versions(run="other") == []


SETS_REFS = """
from fedaiot.registry.store import ModelRegistry
registry = ModelRegistry(folder)
for i in range(100):
    registry.set_refs(**{f"{me}-{i}": "run-r0001"})
"""


def test_writers_in_other_processes_never_drop_each_others_refs(tmp_path: Path) -> None:
    """The coordinator (latest, best), a campaign (candidate) and the service (served) each
    rewrite refs.json: an unlocked read-merge-replace loses refs when two overlap."""
    registry = ModelRegistry(tmp_path)
    registry.register(_state(), _manifest("run-r0001"))
    run_together(SETS_REFS, tmp_path, 4)
    expected = sorted(f"w{n}-{i}" for n in range(4) for i in range(100))
    assert sorted(registry.refs()) == expected


def test_path_like_version_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="invalid"):
        ModelRegistry(tmp_path).manifest("../escape")
