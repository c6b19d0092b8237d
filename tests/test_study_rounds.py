"""A study end to end through the real coordinator and ClientApp handlers, in-process: a
coordinator that holds no data, federated statistics and evaluation with their privacy
charged, and the served model answering by the study's feature names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedaiot.config.run import RunConfig
from fedaiot.rounds.loop import RoundLoop
from fedaiot.simulation.inprocess import InProcessGrid
from fedaiot.studies.bundled import export
from fedaiot.studies.spec import load_study

pytestmark = pytest.mark.usefixtures("flower_identity")
PBC = Path(__file__).parent.parent / "simulations" / "studies" / "pbc.toml"


@pytest.fixture(scope="module")
def pbc_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = load_study(PBC)
    out = tmp_path_factory.mktemp("pbc") / "pbc.csv"
    export("pbc", out, columns=[f.name for f in study.features] + ["status"], sites=3)
    return out


def _cfg(tmp_path: Path, table: Path, **overrides: object) -> RunConfig:
    values = {
        "study": str(PBC),
        "study_data": str(table),
        "site_column": "site",
        "num_rounds": 3,
        "epsilon": 2.0,
        "min_available_nodes": 3,
        "learning_rate": 1.0,
        "sample_rate": 0.5,
        "output_dir": str(tmp_path / "run"),
        **overrides,
    }
    return RunConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("secure", [True, False])
def test_a_study_runs_with_a_coordinator_that_holds_no_data(
    tmp_path: Path, pbc_table: Path, secure: bool
) -> None:
    cfg = _cfg(tmp_path, pbc_table, secure_aggregation=secure)
    loop = RoundLoop(cfg)
    summary = loop.run_rounds(InProcessGrid(cfg, 3))
    assert summary["status"] == "completed" and summary["aggregated_rounds"] == 3
    assert 0 <= summary["metrics"]["accuracy"] <= 1 and "auc" in summary["metrics"]
    statistics = json.loads((cfg.output_path / "statistics.json").read_text())
    assert 20 < statistics["features"]["age"]["mean"] < 80  # from the nodes, never the data
    journal = (cfg.output_path / "journal.jsonl").read_text()
    events = [json.loads(line) for line in journal.splitlines()]
    prepared = next(e for e in events if e["event"] == "prepared")
    assert prepared["error"] == "" and prepared["contributors"] == 3
    evaluated = [e for e in events if e["event"] == "round" and e["metrics"]]
    assert [e["round"] for e in evaluated] == [3]  # every 5 rounds and the last
    # each node's ledger: statistics on the training side, evaluation on the test side
    for site in range(3):
        (path,) = (cfg.output_path / "ledgers" / f"node-{site}").glob("ledger-*.json")
        ledger = json.loads(path.read_text())  # one cohort: every record of the site's table
        sides = sorted((r["kind"], r["side"]) for r in ledger["releases"])
        assert sides == [("evaluation", "test"), ("statistics", "train")]
        assert ledger["test_history"] and len(ledger["rounds"]) == 3
        assert max(r["epsilon"] for r in ledger["releases"]) <= cfg.epsilon
    # the manifest carries the study and its statistics: serving encodes as the nodes did
    manifest = loop.registry.manifest(summary["model_version"])
    assert manifest.task == "study:pbc" and manifest.input_schema["study"]["study"]["id"] == "pbc"


def test_a_study_model_is_served_by_its_feature_names(tmp_path: Path, pbc_table: Path) -> None:
    from fedaiot.registry.signing import generate_keypair, load_private_key, load_public_key
    from fedaiot.registry.store import ModelRegistry
    from fedaiot.serving.inputs import InputError, to_batch
    from fedaiot.serving.models import load_model
    from fedaiot.serving.schemas import model_card

    private, public = generate_keypair(tmp_path / "keys")
    cfg = _cfg(tmp_path, pbc_table, num_rounds=1)
    loop = RoundLoop(cfg)
    loop.registry = ModelRegistry(loop.registry.root, load_private_key(private))
    version = loop.run_rounds(InProcessGrid(cfg, 3))["model_version"]
    model = load_model(
        ModelRegistry(cfg.output_path / "registry"), version, load_public_key(public)
    )
    patient = {"age": 51.2, "sex": "f", "ascites": False, "hepato": True, "spiders": None,
               "edema": "0.5", "bili": 3.2, "chol": None, "albumin": 3.4, "copper": 90,
               "alk.phos": 1800, "ast": 120.5, "trig": 140, "platelet": 250, "protime": 10.8,
               "stage": "3"}  # fmt: skip
    batch = to_batch([patient], model, 100.0, 1e6)
    probabilities = model.predict_proba(batch)
    assert probabilities.shape == (1, 2) and np.isclose(probabilities.sum(), 1.0)
    for bad, message in (
        ({**patient, "sex": "x"}, "not one of ['f', 'm']"),
        ({**patient, "bili": 400}, "outside the study's range [0, 40]"),
        ({k: v for k, v in patient.items() if k != "age"}, "lacks feature 'age'"),
        ({**patient, "Smith": 1}, "1 unknown feature name(s)"),
    ):
        with pytest.raises(InputError) as info:
            to_batch([bad], model, 100.0, 1e6)
        assert message in str(info.value) and "Smith" not in str(info.value)
    card = model_card(model.manifest)
    assert card.input_schema["study"]["study"]["id"] == "pbc"
    assert card.study is not None and card.study.startswith("pbc@1: ")


def test_a_distributed_study_plans_its_noise_for_the_statistics_it_releases_first(
    tmp_path: Path, pbc_table: Path
) -> None:
    # the statistics are charged before round 1: a plan that ignored them would leave the
    # last rounds unpaid, and every node would refuse them
    cfg = _cfg(tmp_path, pbc_table, dp_mode="distributed", num_rounds=6, epsilon=1.0)
    summary = RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 3))
    assert summary["status"] == "completed" and summary["aggregated_rounds"] == 6
    for node in summary["nodes"]:
        assert 0.97 * cfg.epsilon < node["epsilon"] <= cfg.epsilon
        assert node["epsilon_local"] > node["epsilon"]
