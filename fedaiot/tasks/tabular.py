"""Tabular tasks from data bundled with scikit-learn (loaded on first use, as is torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fedaiot.tasks.base import ArrayData, Task

if TYPE_CHECKING:
    from torch import nn

# scikit-learn's names, written out so that describing the task loads no data
# (tests/test_tasks.py checks them against the data set).
_MEASURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
_FEATURES = [
    *(f"mean {m}" for m in _MEASURES),
    *(f"{m} error" for m in _MEASURES),
    *(f"worst {m}" for m in _MEASURES),
]
_NUM_FEATURES = len(_FEATURES)
_HIDDEN = 64


def _load_breast_cancer() -> tuple[ArrayData, ArrayData | None]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    return ArrayData(x=x, y=y), None


def _build_breast_cancer_model() -> nn.Module:
    from torch import nn

    return nn.Sequential(
        nn.Linear(_NUM_FEATURES, _HIDDEN),
        nn.ReLU(),
        nn.Linear(_HIDDEN, 2),
    )


BREAST_CANCER = Task(
    name="breast-cancer",
    description=(
        "Wisconsin diagnostic breast cancer (scikit-learn): 569 records of 30 cell-nucleus "
        "features, malignant vs benign"
    ),
    num_classes=2,
    class_names=["malignant", "benign"],
    input_shape=(_NUM_FEATURES,),
    feature_names=_FEATURES,
    architecture=f"mlp-{_NUM_FEATURES}-{_HIDDEN}-2-relu",
    load=_load_breast_cancer,
    build_model=_build_breast_cancer_model,
    normalize=True,
    positive_class=0,  # malignant: sensitivity is the share of cancers found
)
