"""A study model's instances: objects keyed by the study's feature names, encoded as the
nodes encoded their tables.

A value is a number within the feature's range (numeric), one of its levels (categorical),
true/false or 1/0 (boolean), or null or absent when the study imputes that feature. Anything
else is refused with 422, naming the instance and the study's feature, never the caller's
text.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedaiot.serving.inputs import InputError
from fedaiot.serving.reasons import OUT_OF_RANGE
from fedaiot.studies.encoding import Encoder
from fedaiot.studies.spec import Feature
from fedaiot.studies.table import StudyTable

_LOC = ("body", "instances")


def study_batch(instances: list[Any], encoder: Encoder) -> np.ndarray:
    study = encoder.study
    names = {f.name for f in study.features}
    columns: dict[str, list[float]] = {f.name: [] for f in study.features}
    for i, row in enumerate(instances):
        loc = (*_LOC, i)
        if not isinstance(row, dict):
            raise InputError(
                f"instance {i}: a study model takes objects of the study's feature names", loc
            )
        unknown = len(set(row) - names)
        if unknown:  # counted, not named: the names are the caller's text
            raise InputError(f"instance {i} has {unknown} unknown feature name(s)", loc)
        for feature in study.features:
            columns[feature.name].append(_value(i, feature, row.get(feature.name)))
    arrays = {
        f.name: np.asarray(columns[f.name], dtype=np.int64 if f.kind == "categorical" else float)
        for f in study.features
    }
    table = StudyTable(study, arrays, np.zeros(len(instances), dtype=np.int64))
    return encoder.encode(table)


def _value(i: int, feature: Feature, value: Any) -> float:
    loc = (*_LOC, i)
    name = repr(feature.name)
    if value is None:
        if feature.missing == "refuse":
            raise InputError(f"instance {i} lacks feature {name} (the study refuses missing)", loc)
        return -1 if feature.kind == "categorical" else math.nan
    if feature.kind == "categorical":
        if not isinstance(value, str) or value not in feature.levels:
            raise InputError(f"instance {i}, feature {name}: not one of {feature.levels}", loc)
        return float(feature.levels.index(value))
    if feature.kind == "boolean":
        if isinstance(value, bool) or value in (0, 1):
            return float(value)
        raise InputError(f"instance {i}, feature {name}: expected true or false", loc)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"instance {i}, feature {name}: expected a number", loc)
    assert feature.range is not None
    low, high = feature.range
    if not (math.isfinite(value) and low <= value <= high):
        unit = f" {feature.unit}" if feature.unit else ""
        raise InputError(
            f"instance {i}, feature {name} is outside the study's range [{low:g}, {high:g}]{unit}",
            loc,
            OUT_OF_RANGE,
        )
    return float(value)
