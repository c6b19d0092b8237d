"""A study as a task: its classes, its encoded input width, and the model it declares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedaiot.studies.encoding import Encoder
from fedaiot.studies.spec import Study, StudyError
from fedaiot.tasks.base import ArrayData, Task

if TYPE_CHECKING:
    from torch import nn

PREFIX = "study:"


def _no_pool() -> tuple[ArrayData, ArrayData | None]:
    raise StudyError("a study's data stays with its institutions: there is no pool to load")


def study_task(study: Study) -> Task:
    width = len(Encoder.columns(study))
    classes = list(study.label.classes)
    hidden = list(study.model.hidden)

    def build() -> nn.Module:
        from torch import nn

        layers: list[nn.Module] = []
        size = width
        for units in hidden:
            layers += [nn.Linear(size, units), nn.ReLU()]
            size = units
        return nn.Sequential(*layers, nn.Linear(size, len(classes)))

    shape = "-".join(str(n) for n in [width, *hidden, len(classes)])
    return Task(
        name=PREFIX + study.id,
        description=study.study.title or f"study {study.key}",
        num_classes=len(classes),
        class_names=classes,
        input_shape=(width,),
        feature_names=Encoder.columns(study),
        architecture=f"{study.model.kind}-{shape}",
        load=_no_pool,
        build_model=build,
        positive_class=study.label.positive_index,
    )
