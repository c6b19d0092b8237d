"""The alert rules file: YAML, validated with pydantic, every error one line naming the rule
and the field.

::

    interval_seconds: 15              # how often the service evaluates the rules
    webhook: {url: "https://ops.example/hooks/fedaiot", timeout_seconds: 5}
    rules:
      - {name: accuracy-drop, kind: accuracy_drop, max_drop: 0.01, rollback: true}
      - {name: drift, kind: drift, threshold: 0.25, window_seconds: 600, for_seconds: 300}
      - {name: errors, kind: error_rate, threshold: 0.05, window_seconds: 300, rollback: true}
      - {name: silent-node, kind: node_missing, journal: runs/bc, rounds: 3}
      - {name: budget, kind: budget, journal: runs/bc/journal.jsonl, fraction: 0.8}
      - {name: gate, kind: promotion_gate, margin: 0.0, min_agreement: 0.9, examples: 114}

Model rules (``accuracy_drop``, ``drift``, ``error_rate``) are about the served version and
may roll it back (``rollback: true``); coordinator rules (``node_missing``, ``budget``) read a
run's journal and cannot; ``promotion_gate`` promotes or refuses shadowed candidates. A
journal path is relative to the rules file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from fedaiot.errors import BadInputError

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Severity = Literal["info", "warning", "critical"]


class RulesError(BadInputError):
    """An alert rules file that cannot be used; the message names the rule and the field."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    severity: Severity = "warning"


class AccuracyDrop(_Rule):
    """The served version's metric is lower than the previously served version's."""

    kind: Literal["accuracy_drop"]
    metric: str = "accuracy"
    max_drop: float = Field(default=0.01, ge=0, le=1)  # absolute: 0.01 is one point
    rollback: bool = False


class Drift(_Rule):
    """Some feature's PSI over the window stays past the threshold for ``for_seconds``."""

    kind: Literal["drift"]
    threshold: float = Field(default=0.25, gt=0)
    window_seconds: float = Field(default=600.0, gt=0)
    for_seconds: float = Field(default=300.0, ge=0)
    min_rows: int = Field(default=200, ge=1)
    rollback: bool = False


class ErrorRate(_Rule):
    """Failed (5xx) predict calls, optionally with refused ones (4xx after admission), over
    the window, past the threshold for ``for_seconds``."""

    kind: Literal["error_rate"]
    threshold: float = Field(default=0.05, gt=0, le=1)
    window_seconds: float = Field(default=300.0, gt=0)
    for_seconds: float = Field(default=0.0, ge=0)
    min_requests: int = Field(default=20, ge=1)
    include_refusals: bool = False
    rollback: bool = False


class NodeMissing(_Rule):
    """A node seen in the run has had no counted reply (trained or refused) for ``rounds``
    rounds in a row."""

    kind: Literal["node_missing"]
    journal: Path
    rounds: int = Field(default=3, ge=1)
    rollback: Literal[False] = False


class Budget(_Rule):
    """A node's epsilon spent has reached ``fraction`` of the budget: ``epsilon``, or the run's
    own (its registry's newest manifest) when not given."""

    kind: Literal["budget"]
    journal: Path
    fraction: float = Field(default=0.8, gt=0, le=1)
    epsilon: float | None = Field(default=None, gt=0)
    rollback: Literal[False] = False


class PromotionGate(_Rule):
    """Promote a shadowed candidate that passes ``fedaiot.monitoring.gate``; refuse one that
    cannot."""

    kind: Literal["promotion_gate"]
    metric: str = "accuracy"
    margin: float = Field(default=0.0, ge=-1, le=1)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    min_agreement: float = Field(default=0.9, ge=0, le=1)
    min_shadow_rows: int = Field(default=500, ge=1)
    # Records the metric was measured on: the manifests' ``examples_metric``, else this.
    examples_metric: str = "examples"
    examples: int | None = Field(default=None, ge=1)
    rollback: Literal[False] = False


Rule = Annotated[
    AccuracyDrop | Drift | ErrorRate | NodeMissing | Budget | PromotionGate,
    Field(discriminator="kind"),
]
KINDS = ("accuracy_drop", "drift", "error_rate", "node_missing", "budget", "promotion_gate")
MODEL_RULES = ("accuracy_drop", "drift", "error_rate")


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: HttpUrl
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    headers: dict[str, str] = Field(default_factory=dict)


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval_seconds: float = Field(default=15.0, ge=0.05, le=3600)
    webhook: Webhook | None = None
    rules: list[Rule] = Field(min_length=1)


def _where(raw: Any, loc: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """'rule 'x' (rules[2])' and the rest of the location, for an error at ``loc``."""
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        index, rest = loc[1], loc[2:]
        if rest and rest[0] in KINDS:  # the discriminated union's tag
            rest = rest[1:]
        entry = raw.get("rules", [])[index] if isinstance(raw.get("rules"), list) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        label = f"rule {name!r} (rules[{index}])" if isinstance(name, str) else f"rules[{index}]"
        return label, rest
    return "", loc


def _message(raw: Any, error: Any) -> str:
    label, rest = _where(raw, tuple(error["loc"]))
    field = ".".join(str(part) for part in rest)
    kind, text = error["type"], error["msg"]
    if kind == "extra_forbidden":
        text = "is not a field of this rule (a typo?)" if label else "is not a setting"
    elif kind == "union_tag_invalid":
        given = error["input"].get("kind")
        field, text = "kind", f"unknown kind {given!r}: one of {', '.join(KINDS)}"
    elif kind == "union_tag_not_found":
        field, text = "kind", f"missing: one of {', '.join(KINDS)}"
    elif kind == "literal_error" and rest[-1:] == ("rollback",):
        text = f"only {', '.join(MODEL_RULES)} rules can roll back a model"
    elif kind == "string_pattern_mismatch" and rest[-1:] == ("name",):
        text = "use up to 64 letters, digits, '_', '.' and '-', starting with a letter or digit"
    parts = [p for p in (label, f"field {field!r}" if field else "") if p]
    return f"{': '.join(parts)}: {text}" if parts else text


def parse_rules(text: str, source: str = "<rules>") -> RulesFile:
    """A validated rules file, or RulesError naming the file, the rule and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise RulesError(f"alert rules {source}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RulesError(f"alert rules {source}: expected a mapping with a 'rules' list")
    try:
        rules = RulesFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise RulesError(f"alert rules {source}: {_message(raw, first)}") from None
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules.rules):
        if rule.name in seen:
            raise RulesError(
                f"alert rules {source}: rule {rule.name!r} (rules[{index}]): field 'name': "
                f"rules[{seen[rule.name]}] has this name already"
            )
        seen[rule.name] = index
    return rules


def load_rules(path: Path) -> RulesFile:
    """Read and validate a rules file; journal paths become relative to its folder."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RulesError(f"alert rules {path}: cannot be read: {exc.strerror}") from None
    rules = parse_rules(text, str(path))
    for rule in rules.rules:
        if isinstance(rule, NodeMissing | Budget) and not rule.journal.is_absolute():
            rule.journal = Path(path).parent / rule.journal
    return rules
