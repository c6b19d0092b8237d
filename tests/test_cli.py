"""Bad input to the fedaiot command: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.registry.store import Manifest, ModelRegistry

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], "unknown task 'nope': choose one of breast-cancer, digits"),
        (["--epsilon", "0"], "epsilon must be > 0"),
        (["--epsilon", "-2"], "epsilon must be > 0"),
        (["--task", "basic-motions", "--nodes", "100"], "into 100 nodes"),
        (["--nodes", "0"], "a federation needs at least one node, got 0"),
        (["--partitioner", "random"], "partitioner"),
    ],
)
def test_bad_simulate_input(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", *args, "--output", str(out)])
    assert result.exit_code == BadInputError.exit_code
    assert message in result.output
    assert result.output.strip().startswith("error:")
    assert not out.exists()


def test_missing_data_files_say_how_to_install_them(tmp_path: Path, monkeypatch) -> None:
    from fedaiot.tasks.partition import _load_raw, _plan_lru

    _load_raw.cache_clear()  # another test of this process may have loaded the data already
    _plan_lru.cache_clear()
    monkeypatch.setenv("FEDAIOT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--task", "fashion-mnist", "--output", str(out)])
    assert result.exit_code == BadInputError.exit_code
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert not out.exists()


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["simulate", "--output", str(tmp_path)])
    assert result.exit_code == BadInputError.exit_code
    assert "is not a fedaiot run folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_registry_verify_names_the_tampered_version(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    for round_number in (1, 2):
        version = f"run-r{round_number:04d}"
        manifest = Manifest(
            version=version,
            run="run",
            task="digits",
            architecture="mlp",
            input_schema={},
            round=round_number,
            metrics={"accuracy": 0.5},
            config={},
            weights_sha256="",
            created=time.time(),
        )
        registry.register({"w": torch.ones(2)}, manifest)
    assert runner.invoke(app, ["registry", "verify", str(tmp_path)]).exit_code == 0
    weights = tmp_path / "versions" / "run-r0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b"\x00\x00\x80\x3f", b"\x00\x00\x00\x40"))
    result = runner.invoke(app, ["registry", "verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "run-r0002" in result.output and "hash mismatch" in result.output
    assert "ok\trun-r0001" in result.output


def test_an_attempt_stopped_before_the_coordinator_started_can_be_run_again(
    tmp_path: Path,
) -> None:
    from fedaiot.config.run import RunConfig
    from fedaiot.simulation.engine import preflight

    out = tmp_path / "run"
    (out / "flower").mkdir(parents=True)  # what simulate() writes before Flower runs anything
    (out / "flower.log").write_text("interrupted\n")
    cfg = RunConfig(task="breast-cancer", output_dir=str(out))
    assert preflight(cfg, 5) == 0
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fedaiot run folder"):
        preflight(cfg, 5)


HEAVY = (
    "torch", "opacus", "ray", "sklearn", "sktime", "datasets", "flwr_datasets", "onnx",
    "onnxruntime", "onnxscript",
)  # fmt: skip


def _imported(args: list[str], cwd: Path) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fedaiot", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return {m.split(".")[0] for m in modules}, done


def test_light_commands_load_no_torch_and_no_data_set(tmp_path: Path) -> None:
    from fedaiot.deploy.demo_data import export
    from fedaiot.privacy.ledger import PrivacyLedger

    cfg = RunConfig(task="breast-cancer", output_dir=str(tmp_path))
    data = export(cfg, 3, tmp_path / "data", ["alpha", "beta", "gamma"])[0]
    ledger = PrivacyLedger(tmp_path / "ledger.json", dataset="a" * 64)
    with ledger.update() as record:
        record.history = [(1.0, 0.2, 10)]
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "fedaiot", "keys", "--dir", str(keys)], check=True)
    rules = tmp_path / "alerts.yml"
    rules.write_text("rules:\n  - {name: drift, kind: drift}\n")
    commands = [
        ["--help"],
        ["simulate", "--help"],
        ["export", "--help"],
        ["alerts", "validate", str(rules)],
        [
            "token",
            "issue",
            "--role",
            "clinician",
            "--subject",
            "dr-a",
            "--key",
            str(keys / "coordinator.key"),
        ],
        ["node", "check", "--task", "breast-cancer", "--data", str(data)],
        ["ledger", "show", str(ledger.path)],
        [
            "token",
            "revoke",
            "--list",
            str(tmp_path / "revoked.json"),
            "--subject",
            "dr-a",
            "--key",
            str(keys / "coordinator.key"),
        ],
    ]
    for args in commands:
        loaded, done = _imported(args, tmp_path)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert not loaded & set(HEAVY), (args, sorted(loaded & set(HEAVY)))


def test_run_config_file_then_options_then_set(tmp_path: Path) -> None:
    """Defaults < --run-config FILE < options given on the command line < --set."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("keep me")  # stops the run at preflight
    out = ["--output", str(tmp_path / "keep")]
    file = tmp_path / "run.toml"
    file.write_text('[tool.flwr.app.config]\ntask = "breast-cancer"\nepsilon = -1.0\n')

    from_file = runner.invoke(app, ["simulate", "--run-config", str(file), *out])
    assert from_file.exit_code == 2 and "epsilon must be > 0" in from_file.output
    option_wins = runner.invoke(
        app, ["simulate", "--run-config", str(file), "--epsilon", "2", *out]
    )
    assert option_wins.exit_code == 2 and "not a fedaiot run folder" in option_wins.output
    set_wins = runner.invoke(
        app, ["simulate", "--run-config", str(file), "--epsilon", "2", "--set", "epsilon=-3", *out]
    )
    assert set_wins.exit_code == 2 and "epsilon must be > 0" in set_wins.output
    unknown = runner.invoke(app, ["simulate", "--set", "epsilonn=2", *out])
    assert unknown.exit_code == 2 and "epsilonn" in unknown.output
    broken = tmp_path / "broken.toml"
    broken.write_text("epsilon = ")
    assert "run config" in runner.invoke(app, ["simulate", "--run-config", str(broken)]).output


class _Context:
    """What simulate's option reader asks of click's context: the values, and which were given."""

    def __init__(self, given: dict[str, object]) -> None:
        from fedaiot.cli.simulate import simulate

        defaults = {
            name: param.default
            for name, param in inspect.signature(simulate).parameters.items()
            if name != "ctx"
        }
        self.params = {k: getattr(v, "default", v) for k, v in defaults.items()} | given
        self.given = set(given)

    def get_parameter_source(self, name: str) -> object:
        from click.core import ParameterSource

        return ParameterSource.COMMANDLINE if name in self.given else ParameterSource.DEFAULT


@pytest.mark.parametrize(
    ("given", "mode", "rounds", "lr"),
    [
        ({}, "distributed", 90, 2.0),  # the main job
        ({"secure_aggregation": "off"}, "local", 30, 0.2),  # no distributed DP without it
        ({"dp": "local"}, "local", 30, 0.2),
        ({"dp": "distributed", "rounds": 12, "lr": 0.5}, "distributed", 12, 0.5),
        ({"no_dp": True}, "off", 30, 0.2),
    ],
)
def test_each_dp_mode_takes_its_own_defaults(
    given: dict[str, object], mode: str, rounds: int, lr: float
) -> None:
    from fedaiot.cli.simulate import _values

    values = _values(_Context(given), None, None, [])  # type: ignore[arg-type]
    assert (values["dp-mode"], values["num-rounds"], values["learning-rate"]) == (mode, rounds, lr)
