"""Input drift: the population stability index (PSI) of live counts against the training
frequencies, per feature, from counts alone.

``PSI = sum over bins of (live - train) x ln(live / train)``, with both sides as smoothed
frequencies over the bins of ``fedaiot.tasks.histogram`` (half a count added to every bin, so
an empty bin costs a finite amount). Common readings: below 0.1 stable, 0.1 to 0.25 a moderate
shift, above 0.25 a large one. With few rows it is noisy: about ``(bins - 1) / rows`` comes
from sampling alone, which is why the drift rule asks for a minimum of rows.
"""

from __future__ import annotations

import numpy as np

from fedaiot.tasks.histogram import frequencies


def psi(live: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSI per feature of live counts ``(F, B)`` against training frequencies ``(F, B)``."""
    if live.shape != reference.shape:
        raise ValueError(f"live counts {live.shape} against a reference of {reference.shape}")
    observed = frequencies(live)
    return ((observed - reference) * np.log(observed / reference)).sum(axis=1)
