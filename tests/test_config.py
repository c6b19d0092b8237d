"""One typed configuration: Flower's run config and the CLI go through the same checks."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedaiot.config.run import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_declares_every_field_with_valid_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RunConfig().to_run_config())
    cfg = RunConfig.from_run_config(declared)
    assert cfg.private and cfg.epsilon <= 3 and cfg.partitioner == "dirichlet"


def test_round_trip_through_flower_keys() -> None:
    cfg = RunConfig(task="breast-cancer", epsilon=1.0, num_rounds=4)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": 0}, "epsilon: epsilon must be > 0"),
        ({"epsilon": -1.0}, "epsilon must be > 0"),
        ({"task": "mnist-3d"}, "unknown task 'mnist-3d'"),
        ({"num-rounds": 0}, "num-rounds"),
        ({"partitioner": "random"}, "partitioner"),
        ({"delta": 2.0}, "delta"),
        ({"no-such-key": 1}, "no-such-key"),
        ({"min-train-nodes": 5, "min-available-nodes": 2}, "exceeds"),
    ],
)
def test_bad_values_are_refused_with_one_clear_line(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_fingerprint_ignores_where_the_run_is_written() -> None:
    a = RunConfig(output_dir="/tmp/a")
    assert a.fingerprint() == RunConfig(output_dir="/tmp/b").fingerprint()
    assert a.fingerprint() != RunConfig(epsilon=2.0).fingerprint()
