"""The one typed configuration of a fedaiot run.

Flower hands the apps a flat ``run_config`` mapping with kebab-case keys (from
``[tool.flwr.app.config]`` merged with ``--run-config`` overrides); the ``fedaiot`` CLI
builds the same mapping. Both go through :meth:`RunConfig.from_run_config`, so a bad value is
refused with one clear line wherever it comes from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedaiot.errors import BadInputError
from fedaiot.tasks.names import PartitionerName, check_task_name

StrategyName = Literal["fedavg", "fedavgm", "fedprox", "fedadam"]
DpMode = Literal["local", "distributed", "off"]
_FALSE = {"false", "0", "no", "off"}


class ConfigError(BadInputError):
    """A run configuration value is missing, malformed or out of range."""


def fedaiot_home() -> Path:
    """Where relative paths of a run are anchored: ``$FEDAIOT_HOME`` or ``~/.fedaiot``."""
    return Path(os.environ.get("FEDAIOT_HOME", Path.home() / ".fedaiot")).expanduser()


class RunConfig(BaseModel):
    """Everything that defines one federated training run."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    task: str = "digits"
    # A study file (fedaiot.studies): the institutions' own tables, described in a file every
    # party holds. The coordinator then holds no data: the inputs' statistics and the model's
    # evaluation are computed across the nodes, with DP noise. ``task`` is not used.
    study: str = ""
    # Simulating a study: one table of every site's rows, and the column naming each row's site
    # (one simulated node per site).
    study_data: str = ""
    site_column: str = ""
    # Noise multiplier of each node's release of the feature statistics (once per run): 20
    # costs about 0.16 of epsilon on its own, less composed with training.
    statistics_noise: float = Field(20.0, gt=0)
    num_rounds: int = Field(30, ge=1, le=10_000)
    # Rounds of budget held back for rounds trained again after an interruption (a round whose
    # masked update had left the nodes is charged again when it is run again): every node's
    # noise is planned for num-rounds + spare-rounds rounds.
    spare_rounds: int = Field(0, ge=0, le=10_000)
    partitioner: PartitionerName = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_node: int = Field(2, ge=1)
    seed: int = 42
    # "validation": the coordinator evaluates on a slice of the training pool and the test set
    # is never touched (for tuning hyperparameters); "test": the held-out test set.
    holdout: Literal["test", "validation"] = "test"

    # Where the DP noise is added (docs/privacy.md, "Two modes"): "local", each node noises its
    # own update for its own data set; "distributed", each node adds a share of integer noise
    # inside secure aggregation and a round is one DP-SGD step on the union of the nodes'
    # records, private against a coordinator colluding with at most dp-collusion nodes; "off",
    # no DP (baselines). ``private`` is false exactly when dp-mode is "off" (private=false is
    # the older spelling of dp-mode="off").
    dp_mode: DpMode = "local"
    dp_collusion: int = Field(0, ge=0)
    private: bool = True
    epsilon: float = 3.0
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # The largest L2 norm of the change a node's round may make to the model; a node clips a
    # larger one (post-processing: no privacy cost). One faulty node cannot swamp the average.
    max_update_norm: float = Field(100.0, gt=0)
    # DP-SGD's Poisson sampling rate, the same for every node: the noise is planned from it,
    # never from a node's size (a round is ceil(local-epochs / sample-rate) steps).
    sample_rate: float = Field(0.2, gt=0, le=1)
    # Standard deviation of the Gaussian noise on the count a node releases once per data set.
    count_noise: float = Field(20.0, gt=0)
    # Research only: noise and sampling from the run's seed, reproducible and NOT private.
    # Recorded in every manifest; a deployed node refuses such a run.
    seeded_noise: bool = False

    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)

    strategy: StrategyName = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    server_learning_rate: float = Field(0.05, gt=0)
    # FedAvgM's heavy-ball momentum on the coordinator's step (with dp-mode distributed: momentum
    # SGD on the noisy gradient, post-processing of the DP releases)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_available_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    # Secure aggregation (SecAgg+): on by default; threshold 0 picks the protocol's default.
    secure_aggregation: bool = True
    secagg_threshold: int = Field(0, ge=0)
    secagg_timeout: float = Field(120.0, gt=0)
    # The threat model that sizes SecAgg+'s graph and threshold (fedaiot.secagg.parameters):
    # the fraction of a round's nodes that may collude with the coordinator, the fraction that
    # may drop out, and the security parameter in bits.
    secagg_collusion: float = Field(0.2, ge=0, lt=1)
    secagg_dropout: float = Field(0.1, ge=0, lt=1)
    secagg_security_bits: int = Field(40, ge=40, le=128)
    # Run this many rounds now and pause (0: run to the end); the same config resumes later.
    stop_after_round: int = Field(0, ge=0)
    # Simulated faults for scenarios (fedaiot.simulation.faults); all off in a real deployment.
    fault_drop_rate: float = Field(0.0, ge=0, lt=1)
    fault_straggler_rate: float = Field(0.0, ge=0, le=1)
    fault_straggler_delay: float = Field(0.0, ge=0)

    # Simulation only: the coordinator's first look for replies comes after this many seconds,
    # then twice as long each time up to the reply loop's interval (fedaiot.rounds.exchanges;
    # Flower's in-memory grid waits 0.1 s: four exchanges of a secure round slept 0.4 s).
    simulation_poll: float = Field(0.005, gt=0, le=1)

    output_dir: str = "runs/flwr-run"
    # Simulation only: a folder holding each simulated node's own file, node-<i>/data.csv (or
    # .parquet, .npz, or a data/ folder of class folders), raw values as a deployed node keeps
    # them. The node reads it at every round, so records added between two campaigns are new
    # records to its ledger (fedaiot.privacy.cohorts); its ledger lives next to the file.
    node_data: str = ""
    # Simulation only: where the simulated nodes keep their ledgers (default <output>/ledgers).
    # Campaigns share one folder, so that a node's spend carries from one campaign to the next.
    ledger_root: str = ""
    # Continue from a registered version (a campaign): its weights, hash-checked, are round 0's
    # model instead of a fresh one. The registry folder and the version's name.
    init_registry: str = ""
    init_version: str = ""
    # Deployment: a JSON file of Flower node id -> institution name, written by the
    # coordinator's kit when it registers the keys. Identities come from it, never from nodes.
    node_roster: str = ""

    @model_validator(mode="before")
    @classmethod
    def _dp_mode_and_private(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        private = data.get("private", True)
        if isinstance(private, str):
            private = private.strip().lower() not in _FALSE
        mode = data.get("dp_mode", "local") if private else "off"
        return {**data, "dp_mode": mode, "private": mode != "off"}

    @model_validator(mode="after")
    def _distributed_needs_secure_aggregation(self) -> RunConfig:
        if self.dp_mode == "distributed" and not self.secure_aggregation:
            raise ValueError(
                "dp-mode distributed adds each node's noise share inside secure aggregation: "
                "there is no distributed DP without it (set secure-aggregation=true, or "
                "dp-mode=local)"
            )
        return self

    @field_validator("epsilon")
    @classmethod
    def _epsilon_positive(cls, value: float) -> float:
        if not value > 0 or math.isnan(value):
            raise ValueError("epsilon must be > 0 (use private=false for a non-private baseline)")
        return value

    @field_validator("task")
    @classmethod
    def _task_known(cls, value: str) -> str:
        return check_task_name(value)

    @model_validator(mode="after")
    def _study_complete(self) -> RunConfig:
        if (self.study_data or self.site_column) and not self.study:
            raise ValueError("study-data and site-column simulate a study: set study too")
        if bool(self.study_data) != bool(self.site_column):
            raise ValueError("simulating a study needs both study-data and site-column")
        return self

    @model_validator(mode="after")
    def _campaign_complete(self) -> RunConfig:
        if bool(self.init_registry) != bool(self.init_version):
            raise ValueError("continuing from a model needs both init-registry and init-version")
        if self.node_data and self.study:
            raise ValueError("node-data is for built-in tasks: a study's sites come from its table")
        return self

    @model_validator(mode="after")
    def _nodes_consistent(self) -> RunConfig:
        if self.min_train_nodes > self.min_available_nodes:
            raise ValueError(
                f"min-train-nodes ({self.min_train_nodes}) exceeds "
                f"min-available-nodes ({self.min_available_nodes})"
            )
        return self

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Validate a Flower-style mapping (kebab-case keys) into a RunConfig."""
        fields = {str(key).replace("-", "_"): value for key, value in run_config.items()}
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """The mapping Flower's ``--run-config`` takes (kebab-case keys)."""
        return {key.replace("_", "-"): value for key, value in self.model_dump().items()}

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps a node takes each round: ``local-epochs`` passes in expectation."""
        return max(1, math.ceil(round(self.local_epochs / self.sample_rate, 9)))

    @property
    def planned_rounds(self) -> int:
        """The rounds every node's noise is planned for: the run's and its spares."""
        return self.num_rounds + self.spare_rounds

    @property
    def output_path(self) -> Path:
        path = Path(self.output_dir).expanduser()
        return path if path.is_absolute() else fedaiot_home() / path

    def fingerprint(self) -> str:
        """A stable hash of what makes two runs the same run (where and how long excluded)."""
        volatile = {
            "output_dir",
            "round_timeout",
            "secagg_timeout",
            "stop_after_round",
            "node_roster",
            "simulation_poll",
            "ledger_root",
        }
        fields = self.model_dump(exclude=volatile)
        for key in ("node_data", "init_registry", "init_version", "spare_rounds"):
            if not fields[key]:  # unset: the fingerprint of runs made before these keys existed
                del fields[key]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# What a mode needs when the caller does not say: a distributed round is one DP-SGD step, so it
# takes many more rounds and a larger step (picked on validation for digits, 10 nodes: see the
# README's Results and simulations/sweeps/distributed.toml).
MODE_DEFAULTS: dict[str, dict[str, float | int]] = {
    "local": {"learning-rate": 0.2, "num-rounds": 30, "sample-rate": 0.2},
    "distributed": {"learning-rate": 2.0, "num-rounds": 90, "sample-rate": 0.2},
    "off": {"learning-rate": 0.2, "num-rounds": 30, "sample-rate": 0.2},
}


def node_counts(nodes: int, fraction_train: float = 1.0) -> dict[str, int]:
    """The one rule for a federation of ``nodes``: every node must be available before a round
    starts, and a round waits for as many as the strategy samples (all, at fraction 1)."""
    if nodes < 1:
        raise ConfigError(f"a federation needs at least one node, got {nodes}")
    return {
        "min-available-nodes": nodes,
        "min-train-nodes": max(1, math.ceil(round(fraction_train * nodes, 9))),
    }


def read_run_config(path: Path) -> dict[str, Any]:
    """A TOML file of run-config keys (as in ``[tool.flwr.app.config]``), or ConfigError."""
    import tomllib

    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"run config {path}: {exc}") from None
    section = values.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    return dict(section if isinstance(section, dict) else values)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = "-".join(str(p).replace("_", "-") for p in error["loc"]) or "config"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "invalid run config: " + "; ".join(parts)
