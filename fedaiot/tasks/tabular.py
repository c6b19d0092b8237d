"""Tabular tasks from data bundled with scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedaiot.tasks.base import ArrayData, Task

_BREAST_CANCER = load_breast_cancer()
_NUM_FEATURES = int(_BREAST_CANCER.data.shape[1])
_HIDDEN = 64


def _load_breast_cancer() -> tuple[ArrayData, ArrayData | None]:
    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    return ArrayData(x=x, y=y), None


def _build_breast_cancer_model() -> nn.Module:
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
    class_names=[str(name) for name in _BREAST_CANCER.target_names],
    input_shape=(_NUM_FEATURES,),
    feature_names=[str(name) for name in _BREAST_CANCER.feature_names],
    architecture=f"mlp-{_NUM_FEATURES}-{_HIDDEN}-2-relu",
    load=_load_breast_cancer,
    build_model=_build_breast_cancer_model,
    normalize=True,
    positive_class=0,  # malignant: sensitivity is the share of cancers found
)
