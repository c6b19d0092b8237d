"""How an artifact compares with the float torch model it was exported from.

The evaluation set is the task's held-out test set, exactly the records ``federate`` holds out
for the coordinator with the run's seed (the predefined test file, or the stratified 20 %),
taken raw: both models standardize it the way the manifest's input schema says (the torch model
through ``Standardized``, the artifact inside its graph).
"""

from __future__ import annotations

import numpy as np

from fedaiot.edge.artifact import Parity
from fedaiot.tasks import ArrayData, Task
from fedaiot.tasks.partition import load_raw, plan_partitions


def evaluation_set(task: Task, seed: int) -> tuple[ArrayData, str]:
    """The raw held-out test set of ``task`` for ``seed``, and a line that names it."""
    pool, predefined = load_raw(task)
    if predefined is not None:
        test = predefined
    else:
        index = plan_partitions(task, 1, partitioner="iid", seed=seed).test_index
        assert index is not None  # no predefined test set: the plan holds one out
        test = ArrayData(x=pool.x[index], y=pool.y[index])
    return test, f"held-out test set of {task.name} (seed {seed}), {len(test)} records"


def compare(
    reference: np.ndarray, artifact: np.ndarray, labels: np.ndarray, evaluation_set: str
) -> Parity:
    """The parity record of two models' probabilities ``(n, classes)`` on the same records."""
    if reference.shape != artifact.shape or reference.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probabilities of shapes {reference.shape} and {artifact.shape} for "
            f"{labels.shape[0]} labels"
        )
    said_reference, said_artifact = reference.argmax(axis=1), artifact.argmax(axis=1)
    accuracy_reference = float((said_reference == labels).mean())
    accuracy_artifact = float((said_artifact == labels).mean())
    return Parity(
        evaluation_set=evaluation_set,
        examples=int(labels.shape[0]),
        max_abs_probability_difference=float(np.abs(reference - artifact).max()),
        label_agreement=float((said_reference == said_artifact).mean()),
        accuracy_torch=accuracy_reference,
        accuracy_artifact=accuracy_artifact,
        accuracy_change_points=round((accuracy_artifact - accuracy_reference) * 100.0, 4),
    )
