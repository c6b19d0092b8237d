"""Campaigns refused before anything trains, each with one clear line; what a campaign
inherits from its base; the budget's slack. (The campaigns themselves run end to end in
tests/test_campaign_e2e.py.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedaiot.campaigns.spec import CampaignSpec, campaign_config, resolve_base
from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.errors import BadInputError
from fedaiot.node.deployed import NodeConfigError
from fedaiot.privacy.accounting import BudgetExhaustedError, epsilon_spent, plan_noise
from fedaiot.registry.store import ModelRegistry, RegistryError
from fedaiot.simulation.engine import preflight
from tests.serving_support import V2, make_keys, make_registry


def test_a_campaign_needs_a_served_version_or_a_named_one(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    make_registry(tmp_path / "registry", keys.private)
    spec = CampaignSpec(registry=tmp_path / "registry")
    with pytest.raises(ConfigError, match="serves no version yet: name one with --base"):
        resolve_base(spec, keys.private.public_key())
    named = resolve_base(spec.model_copy(update={"base": V2}), keys.private.public_key())
    assert named is not None and named.version == V2


def test_a_base_not_signed_by_the_coordinator_is_refused(tmp_path: Path) -> None:
    keys, other = make_keys(tmp_path / "k"), make_keys(tmp_path / "other")
    make_registry(tmp_path / "registry", other.private)
    spec = CampaignSpec(registry=tmp_path / "registry", base=V2)
    with pytest.raises(RegistryError, match="bad manifest signature"):
        resolve_base(spec, keys.private.public_key())


def test_a_campaign_inherits_its_base_and_cannot_change_its_task(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    registry = make_registry(tmp_path / "registry", keys.private)
    base = registry.manifest(V2).model_copy(
        update={"config": {**RunConfig(task="breast-cancer", learning_rate=0.05).model_dump()}}
    )
    spec = CampaignSpec(registry=tmp_path / "registry", base=V2, values={"num-rounds": 3})
    cfg, nodes, name = campaign_config(spec, base)
    assert (cfg.task, cfg.learning_rate, cfg.num_rounds) == ("breast-cancer", 0.05, 3)
    assert (cfg.init_version, name, nodes) == (V2, "breast-cancer-c1", 2)
    assert cfg.ledger_root == str((tmp_path / "campaigns" / "ledgers").resolve())
    assert cfg.output_path == (tmp_path / "campaigns" / "breast-cancer-c1").resolve()
    changed = spec.model_copy(update={"values": {"task": "digits"}})
    with pytest.raises(ConfigError, match=r"task 'digits': a campaign continues bc-r0002"):
        campaign_config(changed, base)


def test_a_missing_node_file_is_named_before_anything_trains(tmp_path: Path) -> None:
    (tmp_path / "nodes" / "node-0").mkdir(parents=True)
    cfg = RunConfig.from_run_config({
        "task": "breast-cancer", "node-data": str(tmp_path / "nodes"), "partitioner": "iid",
        "output-dir": str(tmp_path / "run"), "min-available-nodes": 3, "min-train-nodes": 3,
    })  # fmt: skip
    with pytest.raises(NodeConfigError, match=r"simulated node 0 has no file: expected one of "):
        preflight(cfg, 3)


def test_campaign_keys_are_checked_and_leave_old_fingerprints_alone() -> None:
    with pytest.raises(ConfigError, match="needs both init-registry and init-version"):
        RunConfig.from_run_config({"init-version": "bc-r0002"})
    with pytest.raises(ConfigError, match="node-data is for built-in tasks"):
        RunConfig.from_run_config({"node-data": "n", "study": "s.toml"})
    cfg = RunConfig()
    fields = cfg.model_dump(exclude={
        "output_dir", "round_timeout", "secagg_timeout", "stop_after_round", "node_roster",
        "simulation_poll", "ledger_root", "node_data", "init_registry", "init_version",
        "spare_rounds",
    })  # fmt: skip
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == digest  # a run made before campaigns or spares still resumes


def test_a_bad_campaign_name_is_refused() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        CampaignSpec(registry=Path("r"), name="a/b")
    with pytest.raises(BadInputError):
        ModelRegistry(Path("r"))._dir("../x")


def test_the_planners_slack_is_not_budget_left() -> None:
    """A run planned for the whole budget ends a hair below it; a later run may not buy
    updates under noise near the cap with that hair."""
    steps = dict(delta=1e-5, sample_rate=0.2)
    sigma = plan_noise(target_epsilon=3.0, steps=10, **steps)
    spent = [(sigma, 0.2, 10)]
    assert 0.99 * 3.0 <= epsilon_spent(spent, 1e-5) <= 3.0
    with pytest.raises(BudgetExhaustedError, match="the planner's slack"):
        plan_noise(target_epsilon=3.0, steps=15, spent=spent, **steps)


def test_ledger_show_lists_a_node_folders_cohorts(tmp_path: Path) -> None:
    import numpy as np
    from typer.testing import CliRunner

    from fedaiot.cli.main import app
    from fedaiot.privacy.cohorts import open_cohorts
    from fedaiot.tasks import ArrayData

    rng = np.random.default_rng(0)
    old = ArrayData(rng.normal(size=(10, 3)).astype(np.float32), rng.integers(0, 2, 10))
    new = ArrayData(rng.normal(size=(4, 3)).astype(np.float32), rng.integers(0, 2, 4))
    open_cohorts(tmp_path, old)
    open_cohorts(
        tmp_path, ArrayData(np.concatenate([old.x, new.x]), np.concatenate([old.y, new.y]))
    )
    shown = CliRunner().invoke(app, ["ledger", "show", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    cohorts = json.loads(shown.output)["cohorts"]
    assert [(c["records"], c["epsilon"], c["runs"]) for c in cohorts] == [
        (10, 0.0, []),
        (4, 0.0, []),
    ]
    refused = CliRunner().invoke(app, ["ledger", "show", str(tmp_path / "..")])
    assert refused.exit_code == 1 and "not a node's ledger folder" in refused.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--engine", "deployed"], "--engine deployed needs the coordinator's kit: --pki, --state"),
        (["--pki", "pki"], "--pki, --state, --bundle and --approval are for --engine deployed"),
        (
            ["--engine", "deployed", "--nodes", "3", "--pki", "p", "--state", "s", "--bundle",
             "b", "--approval", "a"],
            "--nodes and node-data are for simulated campaigns",
        ),
    ],
)  # fmt: skip
def test_a_deployed_campaign_needs_the_kit_and_only_its_nodes(
    tmp_path: Path, args: list[str], says: str
) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedaiot", "coordinator", "campaign", "--registry",
         str(tmp_path / "registry"), "--base", "fresh", "--task", "breast-cancer", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
