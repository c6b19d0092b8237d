"""``synthetic-<P>``: a generated classification task whose model has about P parameters.

For measuring what fedaiot costs at a given model size (secure aggregation, DP-SGD), not for
accuracy: 2,000 samples of 32 Gaussian features around 10 class centres, and an MLP
32 -> h -> 10 with h chosen to reach the requested parameter count.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from fedaiot.tasks.base import ArrayData, Task

if TYPE_CHECKING:
    from torch import nn

PREFIX = "synthetic-"
FEATURES, CLASSES, SAMPLES = 32, 10, 2000
MIN_PARAMETERS, MAX_PARAMETERS = 1_000, 50_000_000


def _load() -> tuple[ArrayData, ArrayData | None]:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=SAMPLES)
    x = centres[y] + rng.normal(size=(SAMPLES, FEATURES))
    return ArrayData(x.astype(np.float32), y.astype(np.int64)), None


def hidden_units(parameters: int) -> int:
    # 32*h + h (first layer) + 10*h + 10 (second layer) = P
    return max(1, (parameters - CLASSES) // (FEATURES + 1 + CLASSES))


@functools.cache
def synthetic_task(parameters: int) -> Task:
    if not MIN_PARAMETERS <= parameters <= MAX_PARAMETERS:
        raise ValueError(
            f"synthetic tasks take {MIN_PARAMETERS:,} to {MAX_PARAMETERS:,} parameters, "
            f"got {parameters:,}"
        )
    hidden = hidden_units(parameters)

    def build() -> nn.Module:
        from torch import nn

        return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))

    return Task(
        name=f"{PREFIX}{parameters}",
        description=f"generated Gaussian classes, an MLP of about {parameters:,} parameters",
        num_classes=CLASSES,
        class_names=[str(c) for c in range(CLASSES)],
        input_shape=(FEATURES,),
        feature_names=None,
        architecture=f"mlp-{FEATURES}-{hidden}-{CLASSES}",
        load=_load,
        build_model=build,
    )
