"""A study file drafted from one institution's table (``fedaiot study init``).

Every column but the label becomes a feature: numeric when all its values are numbers,
boolean when they are all yes/no-like, categorical when they take at most 30 distinct values,
and left out (with a comment) otherwise. A column with missing values gets ``missing =
"impute"``. The draft is a starting point to review, never to share as it is: its ranges are
the drafting site's own minimum and maximum (widened and rounded), which say something about
that site's records; replace them with the clinical validity ranges before the study is sent to
anyone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedaiot.studies.spec import StudyError, parse_study
from fedaiot.studies.table import FALSE, NA, TRUE, open_table

MAX_LEVELS = 30


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _round_out(low: float, high: float) -> tuple[float, float]:
    span = (high - low) or abs(high) or 1.0
    step = 10 ** math.floor(math.log10(span))
    below, above = (low - 0.1 * span) / step, (high + 0.1 * span) / step
    return math.floor(below) * step, math.ceil(above) * step


def _feature(name: str, values: list[str]) -> list[str]:
    present = [v for v in values if v.lower() not in NA]
    lines = ["[[features]]", f"name = {json.dumps(name)}"]
    if not present:
        return [f"# {name}: every value is missing, left out"]
    numbers = _numbers(present)
    lowered = {v.lower() for v in present}
    if lowered <= TRUE | FALSE and len(lowered) <= 2 and not (numbers and len(set(numbers)) > 2):
        lines.append('kind = "boolean"')
    elif numbers is not None:
        low, high = _round_out(min(numbers), max(numbers))
        lines += [
            'kind = "numeric"',
            'unit = ""  # fill in',
            f"range = [{low:g}, {high:g}]  # drafted from this site's values: set the valid range",
        ]
    elif len(set(present)) <= MAX_LEVELS:
        lines += ['kind = "categorical"', f"levels = {json.dumps(sorted(set(present)))}"]
    else:
        return [f"# {name}: {len(set(present))} distinct texts, not a feature; left out"]
    if len(present) < len(values):
        lines.append('missing = "impute"  # this site has missing values here')
    return [*lines, ""]


def draft_study(path: Path, label: str, study_id: str) -> str:
    """The TOML text of a study drafted from ``path`` (checked: it parses as a study)."""
    table = open_table(Path(path))
    columns = [str(c) for c in table.column_names]
    if label not in columns:
        raise StudyError(f"{path}: no column {label!r} to predict (columns: {', '.join(columns)})")

    def texts(column: str) -> list[str]:
        return ["" if v is None else str(v).strip() for v in table.column(column).to_pylist()]

    classes = sorted({v for v in texts(label) if v.lower() not in NA})
    if len(classes) < 2:
        raise StudyError(f"{path}: column {label!r} holds {len(classes)} class, a study needs two")
    lines = [
        f"# Drafted by `fedaiot study init` from {Path(path).name}: review every line, and",
        "# replace the ranges (this site's own minimum and maximum) before sharing it.",
        "[study]",
        f"id = {json.dumps(study_id)}",
        "version = 1",
        'title = ""',
        "",
        "[label]",
        f"column = {json.dumps(label)}",
        f"classes = {json.dumps(classes)}  # in order: class 0, class 1, ...",
        f"positive = {json.dumps(classes[-1])}  # check: the class sensitivity is about",
        "",
    ]
    for column in columns:
        if column != label:
            lines += _feature(column, texts(column))
    lines += [
        "[model]",
        'kind = "logistic"',
        "",
        "[evaluation]",
        "test_fraction = 0.2",
        "every = 5",
        "",
        "[quality]",
        "min_examples = 20",
        "min_per_class = 5",
        f"max_examples = {max(1000, 10 * table.num_rows)}",
        "",
    ]
    text = "\n".join(lines)
    parse_study(text, "the draft")  # a draft that would not load is a bug, not a draft
    return text
