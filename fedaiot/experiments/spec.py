"""A sweep: the grid of settings a researcher compares, read from a TOML file.

A sweep expands into points. A federated point is one ``fedaiot simulate`` run (the same Flower
apps as a real run); a central point trains the same model on all node data pooled, privately
at the same epsilon or not at all, as the baseline that federation is measured against. A
point's id is a hash of everything that shapes its result, so a sweep can be resumed, and
extended, without rerunning what is already measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.errors import BadInputError

NON_PRIVATE = math.inf  # the epsilon of a non-private point, written `inf` in TOML and CSV


class SweepError(BadInputError):
    """A sweep file is missing, malformed, or names an impossible setting."""


class Partition(BaseModel):
    """``iid``, ``dirichlet-<alpha>`` or ``pathological-<classes per node>``."""

    model_config = ConfigDict(frozen=True)

    label: str

    @field_validator("label")
    @classmethod
    def _known(cls, value: str) -> str:
        kind, _, arg = value.partition("-")
        if kind == "iid" and not arg:
            return value
        try:
            number = float(arg)
        except ValueError:
            number = math.nan
        if (kind == "dirichlet" and number > 0) or (kind == "pathological" and number >= 1):
            return value
        raise ValueError(
            f"unknown partition {value!r}: use iid, dirichlet-<alpha> or pathological-<k>"
        )

    def run_config(self) -> dict[str, Any]:
        kind, _, arg = self.label.partition("-")
        if kind == "dirichlet":
            return {"partitioner": "dirichlet", "dirichlet-alpha": float(arg)}
        if kind == "pathological":
            return {"partitioner": "pathological", "classes-per-node": int(float(arg))}
        return {"partitioner": "iid"}


class Scenario(BaseModel):
    """An operational fault played on top of a normal point (see fedaiot.simulation.faults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    drop_rate: float = Field(0.0, ge=0, lt=1)
    straggler_rate: float = Field(0.0, ge=0, le=1)
    straggler_delay: float = Field(0.0, ge=0)
    round_timeout: float | None = Field(None, gt=0)
    # Another study over node <exhaust_node>'s data takes what is left of its budget after
    # round <exhaust_after_round>: the node must refuse from then on.
    exhaust_node: int | None = Field(None, ge=0)
    exhaust_after_round: int = Field(1, ge=1)

    def run_config(self) -> dict[str, Any]:
        """Only what differs from a fault-free run, so that the control equals a grid point."""
        values: dict[str, Any] = {}
        if self.drop_rate:
            values["fault-drop-rate"] = self.drop_rate
            # secure aggregation sized for the drop-outs the scenario plays
            values["secagg-dropout"] = self.drop_rate
        if self.straggler_rate:
            values["fault-straggler-rate"] = self.straggler_rate
            values["fault-straggler-delay"] = self.straggler_delay
        if self.round_timeout is not None:
            values["round-timeout"] = self.round_timeout
            values["secagg-timeout"] = self.round_timeout
        return values


class CentralSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    enabled: bool = True
    # Tuned once on digits (seeds 1, 2) across epsilon 1 to non-private, then left fixed.
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(256, ge=1, alias="batch-size")
    learning_rate: float = Field(1.0, gt=0, alias="learning-rate")
    max_grad_norm: float = Field(1.0, gt=0, alias="max-grad-norm")


class ScenarioBase(BaseModel):
    """The setting the scenarios are played on; its fault-free twin is also run, as control."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = "digits"
    epsilon: float = 4.0
    nodes: int = Field(10, ge=1)
    partition: str = "iid"
    secure_aggregation: bool = True
    seeds: list[int] = Field(default_factory=lambda: [1])


class SweepSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "sweep"
    tasks: list[str] = Field(default_factory=lambda: ["digits"], min_length=1)
    epsilons: list[float] = Field(default_factory=lambda: [1.0, 4.0, NON_PRIVATE], min_length=1)
    nodes: list[int] = Field(default_factory=lambda: [5], min_length=1)
    partitions: list[str] = Field(default_factory=lambda: ["iid", "dirichlet-0.5"], min_length=1)
    secure_aggregation: list[bool] = Field(default_factory=lambda: [True], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [1], min_length=1)
    rounds: int = Field(15, ge=1)
    # Per task: run-config overrides (kebab-case keys of fedaiot.config.run.RunConfig).
    run_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    central: dict[str, CentralSettings] = Field(default_factory=dict)
    membership: bool = True
    scenarios: list[Scenario] = Field(default_factory=list)
    scenario_base: ScenarioBase = Field(default_factory=ScenarioBase)

    @field_validator("epsilons")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not e > 0 for e in values):
            raise ValueError("every epsilon must be > 0 (inf for non-private)")
        return values

    @field_validator("partitions")
    @classmethod
    def _partitions(cls, values: list[str]) -> list[str]:
        for value in values:
            Partition(label=value)
        return values

    def central_settings(self, task: str) -> CentralSettings:
        return self.central.get(task, CentralSettings())


class Point(BaseModel):
    """One measurement of the sweep."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["federated", "central"]
    task: str
    epsilon: float
    seed: int
    nodes: int = 0
    partition: str = "pooled"
    secure_aggregation: bool = False
    rounds: int = 0
    scenario: str = "none"
    overrides: dict[str, Any] = Field(default_factory=dict)
    exhaust_node: int | None = None
    exhaust_after_round: int = 0

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def id(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def run_config(self, output_dir: Path) -> RunConfig:
        """The federated run this point is (nodes sample as in ``fedaiot simulate``)."""
        values: dict[str, Any] = {
            "task": self.task,
            "num-rounds": self.rounds,
            "seed": self.seed,
            "private": self.private,
            "secure-aggregation": self.secure_aggregation,
            "min-train-nodes": min(2, self.nodes),
            "min-available-nodes": self.nodes,
            **Partition(label=self.partition).run_config(),
            **self.overrides,
            "output-dir": str(output_dir),
        }
        if self.private:
            values["epsilon"] = self.epsilon
        return RunConfig.from_run_config(values)


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep, baselines first (they are quick and anchor the report)."""
    points: list[Point] = []
    for task in spec.tasks:
        settings = spec.central_settings(task)
        if settings.enabled:
            points += [
                Point(
                    kind="central",
                    task=task,
                    epsilon=epsilon,
                    seed=seed,
                    overrides=settings.model_dump(by_alias=True, exclude={"enabled"}),
                )
                for epsilon in spec.epsilons
                for seed in spec.seeds
            ]
    for task in spec.tasks:
        overrides = spec.run_config.get(task, {})
        for nodes in spec.nodes:
            for partition in spec.partitions:
                for secure in spec.secure_aggregation:
                    for epsilon in spec.epsilons:
                        for seed in spec.seeds:
                            points.append(
                                Point(
                                    kind="federated",
                                    task=task,
                                    epsilon=epsilon,
                                    seed=seed,
                                    nodes=nodes,
                                    partition=partition,
                                    secure_aggregation=secure,
                                    rounds=spec.rounds,
                                    overrides=overrides,
                                )
                            )
    if spec.scenarios:
        base = spec.scenario_base
        control = Scenario(name="none")
        for scenario in [control, *spec.scenarios]:
            for seed in base.seeds:
                points.append(
                    Point(
                        kind="federated",
                        task=base.task,
                        epsilon=base.epsilon,
                        seed=seed,
                        nodes=base.nodes,
                        partition=base.partition,
                        secure_aggregation=base.secure_aggregation,
                        rounds=spec.rounds,
                        scenario=scenario.name,
                        overrides={**spec.run_config.get(base.task, {}), **scenario.run_config()},
                        exhaust_node=scenario.exhaust_node,
                        exhaust_after_round=scenario.exhaust_after_round
                        if scenario.exhaust_node is not None
                        else 0,
                    )
                )
    unique = {point.id: point for point in points}  # a scenario control may equal a grid point
    return list(unique.values())


def load_spec(path: Path) -> SweepSpec:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"sweep file {path} is not valid TOML: {exc}") from None
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SweepError(f"sweep file {path}: {problems}") from None
    for point in expand(spec):  # refuse a bad task or run-config key now, not an hour in
        if point.kind == "federated":
            try:
                point.run_config(Path("/nonexistent"))
            except ConfigError as exc:
                raise SweepError(f"sweep file {path}: {exc}") from None
    return spec
