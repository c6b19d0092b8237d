"""IoT sensor time-series tasks from data sets bundled with sktime."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from fedaiot.tasks.base import ArrayData, Task

if TYPE_CHECKING:
    from torch import nn

BASIC_MOTIONS_CLASSES = ["badminton", "running", "standing", "walking"]
BASIC_MOTIONS_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


def _load_sktime(loader_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Call one of sktime's bundled loaders quietly; returns (X float64 3-D, y strings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sktime import datasets as sktime_datasets

        loader = getattr(sktime_datasets, loader_name)
        x, y = loader(return_type="numpy3D")
    return np.asarray(x), np.asarray(y)


def _encode(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.asarray([lookup[str(label)] for label in labels], dtype=np.int64)


Widths = tuple[int, int]


def _conv1d_classifier(
    in_channels: int, num_classes: int, widths: Widths, stride: int = 1
) -> nn.Module:
    """Small 1-D CNN: two conv blocks with GroupNorm, global average pooling, linear head."""
    from torch import nn

    first, second = widths
    return nn.Sequential(
        nn.Conv1d(in_channels, first, kernel_size=5, stride=stride, padding=2),
        nn.GroupNorm(4, first),
        nn.ReLU(),
        nn.Conv1d(first, second, kernel_size=5, stride=stride, padding=2),
        nn.GroupNorm(4, second),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(second, num_classes),
    )


# The conv blocks' channels, picked on validation accuracy with simulations/sensor_widths.py
# (docs/operations.md, "Edge models"); at 16 and 32 the graph outweighed the int8 weights.
WIDTHS: Widths = (64, 128)


def sensor_model(task_name: str, widths: Widths) -> nn.Module:
    """A sensor task's CNN at other widths than the task's own: for comparing widths."""
    builders = {"basic-motions": _basic_motions_model, "acsf1": _acsf1_model}
    if task_name not in builders:
        raise ValueError(f"{task_name!r} is not a sensor task ({', '.join(builders)})")
    return builders[task_name](widths)


# --- basic-motions ----------------------------------------------------------------------------


def _load_basic_motions() -> tuple[ArrayData, ArrayData | None]:
    x, y = _load_sktime("load_basic_motions")
    data = ArrayData(x=x.astype(np.float32), y=_encode(y, BASIC_MOTIONS_CLASSES))
    return data, None


def _basic_motions_model(widths: Widths) -> nn.Module:
    return _conv1d_classifier(len(BASIC_MOTIONS_CHANNELS), len(BASIC_MOTIONS_CLASSES), widths)


def _build_basic_motions_model() -> nn.Module:
    return _basic_motions_model(WIDTHS)


BASIC_MOTIONS = Task(
    name="basic-motions",
    description=(
        "BasicMotions (UEA, bundled with sktime): smart-watch accelerometer + gyroscope, "
        "80 recordings of 6 channels x 100 steps (10 s at 10 Hz), 4 activities"
    ),
    num_classes=len(BASIC_MOTIONS_CLASSES),
    class_names=list(BASIC_MOTIONS_CLASSES),
    input_shape=(len(BASIC_MOTIONS_CHANNELS), 100),
    feature_names=None,
    architecture=f"cnn1d-c{WIDTHS[0]}k5-gn-c{WIDTHS[1]}k5-gn-gap-4",
    load=_load_basic_motions,
    build_model=_build_basic_motions_model,
    normalize=True,
)


# --- acsf1 ------------------------------------------------------------------------------------

# The UCR labels are the digits 0-9; the archive does not say which appliance each one is.
ACSF1_CLASSES = [str(i) for i in range(10)]
ACSF1_LENGTH = 1460


def _load_acsf1() -> tuple[ArrayData, ArrayData | None]:
    x, y = _load_sktime("load_acsf1")
    return ArrayData(x=x.astype(np.float32), y=_encode(y, ACSF1_CLASSES)), None


def _acsf1_model(widths: Widths) -> nn.Module:
    from torch import nn

    stem = widths[0] // 2
    return nn.Sequential(
        nn.Conv1d(1, stem, kernel_size=8, stride=4, padding=2),  # 1460 -> 365
        nn.GroupNorm(2, stem),
        nn.ReLU(),
        _conv1d_classifier(stem, len(ACSF1_CLASSES), widths, stride=2),
    )


def _build_acsf1_model() -> nn.Module:
    return _acsf1_model(WIDTHS)


ACSF1 = Task(
    name="acsf1",
    description=(
        "ACSF1 (UCR, bundled with sktime): smart-plug power readings of home appliances, "
        "200 series of 1460 steps, 10 appliance types"
    ),
    num_classes=len(ACSF1_CLASSES),
    class_names=list(ACSF1_CLASSES),
    input_shape=(1, ACSF1_LENGTH),
    feature_names=None,
    architecture=(f"cnn1d-c{WIDTHS[0] // 2}k8s4-gn-c{WIDTHS[0]}k5s2-gn-c{WIDTHS[1]}k5s2-gn-gap-10"),
    load=_load_acsf1,
    build_model=_build_acsf1_model,
    normalize=True,
)
