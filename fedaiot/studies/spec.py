"""A study: what an institution's table must hold, how it is encoded, and which model learns it.

A study file is TOML, checked here field by field (pydantic)::

    [study]
    id = "pima-diabetes"
    version = 1
    title = "Type 2 diabetes in Pima women"

    [label]
    column = "type"
    classes = ["No", "Yes"]          # in order: class 0, class 1
    positive = "Yes"
    codings = { "0" = "No", "1" = "Yes" }   # optional: other spellings a file may use

    [[features]]
    name = "glu"
    kind = "numeric"                 # numeric, categorical or boolean
    unit = "mg/dL"
    range = [0, 300]                 # a value outside is refused
    missing = "impute"               # refuse (the default) or impute

    [model]
    kind = "logistic"                # or "mlp" with hidden = [32]

    [evaluation]
    test_fraction = 0.2              # each node's local test split, never trained on
    every = 5                        # federated evaluation every k rounds (and the last)

    [quality]
    min_examples = 20
    min_per_class = 5
    max_examples = 5000              # the most examples (the largest weight) one node carries

Everyone in a study (coordinator and institutions) holds the same file; a node whose study id
or version differs from the coordinator's refuses the run.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedaiot.errors import BadInputError

Missing = Literal["refuse", "impute"]


class StudyError(BadInputError):
    """A study file that cannot be used, or a table that does not fit its study."""

    reason = "data-error"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Header(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: int = Field(ge=1)
    title: str = ""


class Label(_Strict):
    column: str = Field(min_length=1)
    classes: list[str] = Field(min_length=2)
    positive: str | None = None
    codings: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Label:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes repeat: {self.classes}")
        if self.positive is not None and self.positive not in self.classes:
            raise ValueError(f"positive {self.positive!r} is not one of {self.classes}")
        unknown = sorted(set(self.codings.values()) - set(self.classes))
        if unknown:
            raise ValueError(f"codings map to unknown classes {unknown}")
        return self

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive) if self.positive is not None else 1


class Feature(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["numeric", "categorical", "boolean"]
    unit: str = ""
    range: tuple[float, float] | None = None
    levels: list[str] = Field(default_factory=list)
    missing: Missing = "refuse"

    @model_validator(mode="after")
    def _consistent(self) -> Feature:
        if self.kind == "numeric":
            if self.range is None:
                raise ValueError("a numeric feature needs its valid range = [low, high]")
            low, high = self.range
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"range must be two finite numbers, low < high, got {self.range}")
        elif self.range is not None:
            raise ValueError(f"a {self.kind} feature has no range")
        if self.kind == "categorical" and len(self.levels) < 2:
            raise ValueError("a categorical feature needs at least two levels")
        if self.kind != "categorical" and self.levels:
            raise ValueError(f"a {self.kind} feature has no levels")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels repeat: {self.levels}")
        return self

    @property
    def centre(self) -> float:
        assert self.range is not None
        return (self.range[0] + self.range[1]) / 2

    @property
    def half_width(self) -> float:
        """Half the valid range: a value's distance from the centre is at most this."""
        assert self.range is not None
        return (self.range[1] - self.range[0]) / 2


class Model(_Strict):
    kind: Literal["logistic", "mlp"] = "logistic"
    hidden: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Model:
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("an mlp needs its hidden layer sizes, e.g. hidden = [32]")
        if self.kind == "logistic" and self.hidden:
            raise ValueError("a logistic model has no hidden layers")
        if any(size < 1 for size in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {self.hidden}")
        return self


class Evaluation(_Strict):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    every: int = Field(5, ge=1)
    seed: int = 0  # part of which records a node holds out: public, not a secret


class Quality(_Strict):
    min_examples: int = Field(20, ge=2)
    min_per_class: int = Field(5, ge=1)
    # A node with more rows is refused, and no node's weight in the average exceeds it: one
    # institution (or one file of random rows) cannot outweigh the rest.
    max_examples: int = Field(100_000, ge=2)


class Study(_Strict):
    study: Header
    label: Label
    features: list[Feature] = Field(min_length=1)
    model: Model = Model()
    evaluation: Evaluation = Evaluation()
    quality: Quality = Quality()

    @model_validator(mode="after")
    def _names_unique(self) -> Study:
        names = [f.name for f in self.features]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"features repeat: {repeated}")
        if self.label.column in names:
            raise ValueError(f"the label column {self.label.column!r} is also a feature")
        return self

    @property
    def id(self) -> str:
        return self.study.id

    @property
    def version(self) -> int:
        return self.study.version

    @property
    def key(self) -> str:
        """What nodes compare with the coordinator's: ``<id>@<version>``."""
        return f"{self.study.id}@{self.study.version}"


def parse_study(text: str, source: str = "study") -> Study:
    """A study from TOML text; StudyError naming every field at fault."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Study.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _where(raw, error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise StudyError(f"{source}: " + "; ".join(problems)) from None


def load_study(path: Path) -> Study:
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise StudyError(f"study file {path}: {exc.strerror or exc}") from None
    return parse_study(text, f"study file {path}")


def _where(raw: dict[str, object], loc: tuple[int | str, ...]) -> str:
    """``features[2] (glu).range`` rather than ``features.2.range``."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int) and parts:
            name = ""
            if loc[:i] == ("features",):
                features = raw.get("features")
                if isinstance(features, list) and part < len(features):
                    entry = features[part]
                    name = f" ({entry.get('name')})" if isinstance(entry, dict) else ""
            parts[-1] += f"[{part}]{name}"
        else:
            parts.append(str(part))
    return ".".join(parts) or "study"
