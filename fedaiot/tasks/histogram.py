"""Histograms of standardized inputs: the bins on which input drift is measured.

A value is binned on the standardized scale, ``z = (x - mean) / std`` with the manifest's
normalization, so one set of edges fits every feature: half a standard deviation wide from -2
to +2, plus two open tails, 10 bins. A feature of an image or a series (axis 1 of ``(n, C,
...)``) is a channel, and every value of that channel counts.

The coordinator stores the frequencies of its held-out set in the manifest
(``input_schema["drift_reference"]``, see ``reference``); where a manifest has none, the
training distribution is taken to be the standard normal (``standard_normal``), which is
exact only for normally distributed features. Frequencies are smoothed with half a count per
bin, so no bin is ever empty (an empty bin would make the population stability index
infinite). Only counts are kept: never the values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# In standard deviations from the training mean; bins are (-inf, -2), [-2, -1.5), ... [2, inf).
EDGES: tuple[float, ...] = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
BINS = len(EDGES) + 1
PSEUDO_COUNT = 0.5  # added to every bin before counts become frequencies


def bin_counts(z: np.ndarray) -> np.ndarray:
    """Counts per feature (axis 1) and bin of a standardized batch ``(n, C, ...)``: ``(C, BINS)``
    int64."""
    if z.ndim < 2:
        raise ValueError(f"expected a batch of shape (n, features, ...), got {z.shape}")
    features = z.shape[1]
    values = np.moveaxis(z, 1, 0).reshape(features, -1)
    index = np.searchsorted(np.asarray(EDGES), values, side="right")
    index += (np.arange(features) * BINS)[:, None]
    counts = np.bincount(index.ravel(), minlength=features * BINS)
    return counts.reshape(features, BINS).astype(np.int64)


def frequencies(counts: np.ndarray) -> np.ndarray:
    """Smoothed frequencies of ``(C, BINS)`` counts: each row sums to 1, no bin is 0."""
    smoothed = np.asarray(counts, dtype=np.float64) + PSEUDO_COUNT
    return smoothed / smoothed.sum(axis=1, keepdims=True)


def standard_normal() -> np.ndarray:
    """The probability of each bin under the standard normal: ``(BINS,)``."""
    cdf = [0.0, *(0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in EDGES), 1.0]
    return np.diff(np.asarray(cdf))


def reference(z: np.ndarray) -> dict[str, Any]:
    """The manifest's ``drift_reference`` for a standardized held-out set ``z``."""
    counts = bin_counts(z)
    return {
        "edges": list(EDGES),
        "frequencies": [[round(float(f), 6) for f in row] for row in frequencies(counts)],
        "values_per_feature": int(counts[0].sum()),
    }


def reference_frequencies(schema: dict[str, Any], features: int) -> np.ndarray:
    """The training frequencies ``(features, BINS)`` a manifest's input schema gives: its
    ``drift_reference`` if it has one, else the standard normal for every feature. A reference
    that does not fit raises ValueError naming what is wrong."""
    found = schema.get("drift_reference")
    if found is None:
        return np.tile(standard_normal(), (features, 1))
    if not isinstance(found, dict) or [float(e) for e in found.get("edges", [])] != list(EDGES):
        raise ValueError(f"drift_reference must have the edges {list(EDGES)}")
    table = np.asarray(found.get("frequencies"), dtype=np.float64)
    if table.shape != (features, BINS):
        raise ValueError(
            f"drift_reference has frequencies of shape {list(table.shape)}, "
            f"expected [{features}, {BINS}]"
        )
    if not (np.isfinite(table).all() and (table > 0).all()):
        raise ValueError("drift_reference frequencies must be finite and positive")
    if not np.allclose(table.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("drift_reference frequencies must sum to 1 for every feature")
    return table
