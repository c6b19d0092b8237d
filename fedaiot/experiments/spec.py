"""A sweep: the grid of settings a researcher compares, read from a TOML file.

A sweep expands into points. A federated point is one ``fedaiot simulate`` run (the same Flower
apps as a real run); a central point trains the same model on all node data pooled, privately
at the same epsilon or not at all, as the baseline that federation is measured against. A
point's id is a hash of everything that shapes its result, so a sweep can be resumed, and
extended, without rerunning what is already measured.

Private federated points are run in each of the sweep's ``dp_modes`` (``local``: each node
noises its own update; ``distributed``: noise shares inside secure aggregation, one DP-SGD
step a round; see ``RunConfig.dp_mode``). Distributed DP needs secure aggregation, so a grid
that crosses ``secure_aggregation = [true, false]`` with ``distributed`` runs distributed points
with secure aggregation only; a grid with no secure aggregation at all is refused, rather than
silently measuring no distributed point. Distributed runs take other hyperparameters (many
one-step rounds): ``[distributed.<task>]`` holds run-config overrides applied on top of
``[run_config.<task>]`` for distributed points only, its ``num-rounds`` their rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.errors import BadInputError

NON_PRIVATE = math.inf  # the epsilon of a non-private point, written `inf` in TOML and CSV

SweepDpMode = Literal["local", "distributed"]
BUDGET_PREFIX = "epsilon-"  # [distributed.<task>.epsilon-<e>]: overrides at one budget
# The dp_modes axis decides these for each point; an override could relabel a point's mode.
_AXIS_KEYS = frozenset({"dp-mode", "private"})
_LOCAL_ONLY: list[SweepDpMode] = ["local"]


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
    dp_modes: list[SweepDpMode] = Field(default_factory=lambda: _LOCAL_ONLY.copy(), min_length=1)
    rounds: int = Field(15, ge=1)
    # Per task: run-config overrides (kebab-case keys of fedaiot.config.run.RunConfig).
    run_config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Per task: overrides for distributed points only, on top of run_config; num-rounds here
    # is those points' rounds.
    distributed: dict[str, dict[str, Any]] = Field(default_factory=dict)
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

    @field_validator("run_config", "distributed")
    @classmethod
    def _no_axis_keys(cls, values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for task, overrides in values.items():
            taken = sorted(_AXIS_KEYS & set(overrides))
            if taken:
                raise ValueError(
                    f"{task}: {', '.join(taken)} is set by the sweep (dp_modes, and epsilon inf "
                    "for non-private points), not per task"
                )
        return values

    @field_validator("distributed")
    @classmethod
    def _rounds(cls, values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for task, overrides in values.items():
            budgets = {k: v for k, v in overrides.items() if k.startswith(BUDGET_PREFIX)}
            for key, table in budgets.items():
                if not isinstance(table, dict):
                    raise ValueError(f"{task}.{key} must be a table of run-config keys")
                taken = sorted(_AXIS_KEYS & set(table))
                if taken:
                    raise ValueError(f"{task}.{key}: {', '.join(taken)} is set by the sweep")
            for table in [overrides, *budgets.values()]:
                rounds = table.get("num-rounds", 1)
                if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
                    raise ValueError(f"{task}: num-rounds must be a whole number >= 1")
        return values

    @model_validator(mode="after")
    def _distributed_is_possible(self) -> SweepSpec:
        unknown = sorted(set(self.distributed) - set(self.tasks))
        if unknown:  # a misspelt task would run its distributed points with local settings
            raise ValueError(f"[distributed.{unknown[0]}] names a task not in tasks")
        budgets = {f"{BUDGET_PREFIX}{e:g}" for e in self.epsilons}
        for task, table in self.distributed.items():
            stray = sorted(k for k in table if k.startswith(BUDGET_PREFIX) and k not in budgets)
            if stray:  # a misspelt budget would silently fall back to the task's settings
                raise ValueError(
                    f"[distributed.{task}.{stray[0]}] is not one of the sweep's epsilons "
                    f"({', '.join(sorted(budgets))})"
                )
        if "distributed" in self.dp_modes and True not in self.secure_aggregation:
            raise ValueError(
                "dp_modes has distributed but secure_aggregation has no true: distributed DP "
                "adds its noise inside secure aggregation"
            )
        return self

    def central_settings(self, task: str) -> CentralSettings:
        return self.central.get(task, CentralSettings())

    def mode_settings(
        self, task: str, mode: SweepDpMode, epsilon: float = math.inf
    ) -> tuple[int, dict[str, Any]]:
        """A federated point's rounds and run-config overrides in ``mode`` at ``epsilon``: a
        ``[distributed.<task>.epsilon-<e>]`` table (``epsilon-1``, ``epsilon-3``) refines its
        task's for that budget (a smaller budget often wants a smaller step)."""
        overrides = dict(self.run_config.get(task, {}))
        if mode == "local":
            return self.rounds, overrides
        table = self.distributed.get(task, {})
        extra = {k: v for k, v in table.items() if not k.startswith(BUDGET_PREFIX)}
        extra.update(table.get(f"{BUDGET_PREFIX}{epsilon:g}", {}))
        rounds = int(extra.pop("num-rounds", self.rounds))
        return rounds, {**overrides, **extra}


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
    # Meaningful for private federated points only (a non-private run is dp-mode off).
    dp_mode: SweepDpMode = "local"

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def id(self) -> str:
        fields = self.model_dump(mode="json")
        if fields["dp_mode"] == "local":
            # ids from before the dp_modes axis: recorded local points are still recognised
            del fields["dp_mode"]
        blob = json.dumps(fields, sort_keys=True, default=str)
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
            "dp-mode": self.dp_mode if self.private else "off",
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
        for nodes in spec.nodes:
            for partition in spec.partitions:
                for secure in spec.secure_aggregation:
                    for mode in spec.dp_modes:
                        if mode == "distributed" and not secure:
                            continue  # no distributed DP without secure aggregation
                        for epsilon in spec.epsilons:
                            if mode != "local" and not math.isfinite(epsilon):
                                continue  # a non-private run has no mode: measured once
                            rounds, overrides = spec.mode_settings(task, mode, epsilon)
                            points += [
                                Point(
                                    kind="federated",
                                    task=task,
                                    epsilon=epsilon,
                                    seed=seed,
                                    nodes=nodes,
                                    partition=partition,
                                    secure_aggregation=secure,
                                    rounds=rounds,
                                    overrides=overrides,
                                    dp_mode=mode,
                                )
                                for seed in spec.seeds
                            ]
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
        problems = "; ".join(_problem(e["loc"], str(e["msg"])) for e in exc.errors())
        raise SweepError(f"sweep file {path}: {problems}") from None
    for point in expand(spec):  # refuse a bad task or run-config key now, not an hour in
        if point.kind == "federated":
            try:
                point.run_config(Path("/nonexistent"))
            except ConfigError as exc:
                raise SweepError(f"sweep file {path}: {exc}") from None
    return spec


def _problem(location: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    # a check across fields has no location
    return f"{'.'.join(str(p) for p in location)}: {message}" if location else message
