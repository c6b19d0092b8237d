"""From a study's table to the model's inputs, with statistics the nodes compute together.

The coordinator holds no data, so the statistics that standardize the inputs are computed
across the nodes: each node sums, over its training records, a vector of bounded per-record
contributions (:func:`contributions`), adds Gaussian noise, and the coordinator sees only the
sum through secure aggregation (:func:`statistics_from_sums`). A record's contribution has an
L2 norm of at most :func:`sensitivity`: every value is clipped to its feature's range and
divided by the range's largest magnitude, so each entry lies in [-1, 1].

The encoding (:class:`Encoder`): a numeric feature becomes its standardized value (a missing
one the mean, i.e. 0, with a missing indicator when the study imputes it); a categorical one a
one-hot of its levels (all zeros when missing, with an indicator); a boolean its 0/1 value (the
federated rate when missing, with an indicator).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from fedaiot.studies.spec import Feature, Study
from fedaiot.studies.table import StudyTable

MIN_STD_FRACTION = 1e-3  # of the range: a constant or noise-swamped feature stays finite


class FeatureStatistics(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float = 0.0
    std: float = 1.0
    frequencies: list[float] = []  # categorical: each level's share; boolean: [rate of true]


class Statistics(BaseModel):
    """What the encoding needs, per feature name; kept in the run and in every manifest."""

    model_config = ConfigDict(frozen=True)

    features: dict[str, FeatureStatistics]
    examples: float  # the (noisy) number of records they were computed over

    def to_record(self) -> dict[str, list[float]]:
        return {
            "statistics-" + name: [s.mean, s.std, *s.frequencies]
            for name, s in self.features.items()
        }

    @classmethod
    def from_record(cls, study: Study, record: dict[str, object]) -> Statistics:
        features = {}
        for feature in study.features:
            values = [float(v) for v in record["statistics-" + feature.name]]  # type: ignore[attr-defined]
            features[feature.name] = FeatureStatistics(
                mean=values[0], std=values[1], frequencies=values[2:]
            )
        return cls(features=features, examples=0.0)


def _width(feature: Feature) -> int:
    return {"numeric": 3, "categorical": len(feature.levels), "boolean": 2}[feature.kind]


def contribution_length(study: Study) -> int:
    return sum(_width(f) for f in study.features)


def sensitivity(study: Study) -> float:
    """The largest L2 norm one record's contribution can have."""
    per_record = {"numeric": 3.0, "categorical": 1.0, "boolean": 2.0}
    return math.sqrt(sum(per_record[f.kind] for f in study.features))


def contributions(table: StudyTable) -> np.ndarray:
    """The sum over ``table``'s records of their bounded contributions (no noise yet)."""
    parts = []
    for feature in table.study.features:
        values = table.columns[feature.name]
        if feature.kind == "numeric":
            present = ~np.isnan(values)
            assert feature.range is not None
            # centred on the range's middle, in half-widths: every record in [-1, 1], and the
            # sums as large as they can be against the same noise
            scaled = (
                np.clip(values[present], *feature.range) - feature.centre
            ) / feature.half_width
            parts.append([present.sum(), scaled.sum(), (scaled**2).sum()])
        elif feature.kind == "categorical":
            parts.append([(values == i).sum() for i in range(len(feature.levels))])
        else:
            present = ~np.isnan(values)
            parts.append([present.sum(), values[present].sum()])
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def statistics_from_sums(study: Study, sums: np.ndarray, noise_std: float = 0.0) -> Statistics:
    """The statistics the summed contributions give, knowing the noise in them.

    ``noise_std`` is the standard deviation of the noise in each summed entry (every node's
    noise together). With it each estimate is shrunk towards what the study already says
    (its range: a mean near the middle, a spread of a quarter of the range, uniform levels),
    weighing the two by their variances: where the noise swamps a sum (few records, a small
    budget) the study's prior decides, where the records are many the data does. Nothing the
    noise can do leaves a count, a share or a variance outside what is possible.
    """
    features, offset, examples = {}, 0, []
    floor = max(noise_std, 1.0)  # a count below the noise says nothing
    for feature in study.features:
        part = np.asarray(sums[offset : offset + _width(feature)], dtype=np.float64)
        offset += _width(feature)
        if feature.kind == "numeric":
            assert feature.range is not None
            low, high = feature.range
            count = max(float(part[0]), floor)
            examples.append(count)
            noise_var = (noise_std / count) ** 2  # of each normalized moment estimate
            spread = 0.5  # the prior: a mean at the centre, a spread of half a half-width
            raw_mean = float(np.clip(part[1] / count, -1, 1))
            raw_std = math.sqrt(max(float(part[2] / count) - raw_mean**2, 0.0))
            weight = spread**2 / (spread**2 + noise_var)  # how far the data is trusted
            mean = feature.centre + weight * raw_mean * feature.half_width
            std = (weight * raw_std + (1 - weight) * spread) * feature.half_width
            least = MIN_STD_FRACTION * (high - low)
            features[feature.name] = FeatureStatistics(
                mean=min(max(mean, low), high), std=max(std, least)
            )
        elif feature.kind == "categorical":
            counts = np.maximum(part, 0.0) + floor / len(part)  # towards uniform
            features[feature.name] = FeatureStatistics(frequencies=(counts / counts.sum()).tolist())
        else:
            count = max(float(part[0]), 0.0) + floor
            rate = float(np.clip((part[1] + floor / 2) / count, 0.0, 1.0))
            features[feature.name] = FeatureStatistics(frequencies=[rate])
    return Statistics(features=features, examples=float(np.median(examples)) if examples else 0.0)


class Encoder:
    """A study's table as the model's float32 inputs, given the federated statistics."""

    def __init__(self, study: Study, statistics: Statistics) -> None:
        self.study, self.statistics = study, statistics

    @staticmethod
    def columns(study: Study) -> list[str]:
        """The names of the model's inputs, in order (fixed by the study alone)."""
        names: list[str] = []
        for f in study.features:
            if f.kind == "categorical":
                names += [f"{f.name}={level}" for level in f.levels]
            else:
                names.append(f.name)
            if f.missing == "impute":
                names.append(f"{f.name} missing")
        return names

    def encode(self, table: StudyTable) -> np.ndarray:
        blocks = []
        for feature in self.study.features:
            values = table.columns[feature.name]
            stats = self.statistics.features[feature.name]
            if feature.kind == "categorical":
                missing = values < 0
                block = np.stack([values == i for i in range(len(feature.levels))], axis=1)
                blocks.append(block.astype(np.float64))
            else:
                missing = np.isnan(values)
                if feature.kind == "numeric":
                    assert feature.range is not None
                    clipped = np.clip(values, *feature.range)
                    column = np.where(missing, 0.0, (clipped - stats.mean) / stats.std)
                else:
                    column = np.where(missing, stats.frequencies[0], values)
                blocks.append(column[:, None])
            if feature.missing == "impute":
                blocks.append(missing.astype(np.float64)[:, None])
        return np.concatenate(blocks, axis=1).astype(np.float32)
