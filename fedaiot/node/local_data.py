"""An institution's own data files, read and checked against the task's declared schema.

A deployed node trains on files the institution keeps; a file that does not match what the
task's model takes is refused when the node starts, with a message naming the column or the
shape at fault, so that no round is ever attempted on data the model cannot learn from.

Accepted layouts (values in the units of the task's reference data, *before* normalization;
the node standardizes them with the statistics the coordinator sends, see docs/deployment.md):

- tabular tasks (1-D input with named features): a ``.csv`` file with a header row, or a
  ``.parquet`` file, holding the task's feature columns and a ``label`` column, in any order
  (other columns, an id say, are ignored). A label is a class name (``malignant``) or a class
  index (``0``). The file is read by the studies' reader (`fedaiot.studies.table`): a built-in
  tabular task is a study whose features are all numeric and refuse missing values.
- every task: a ``.npz`` file with arrays ``x`` (``(n, *input_shape)``, numeric) and ``y``
  (``(n,)``, class indices or class names).
- image and sensor tasks: a folder with one sub-folder per class name, each holding one
  ``.npy`` file per sample of shape ``input_shape`` (for example ``coat/0001.npy``).

Arrays are read with ``allow_pickle=False``: nothing is ever unpickled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from fedaiot.errors import BadInputError
from fedaiot.studies.spec import Feature, Header, Label, Quality, Study, StudyError
from fedaiot.studies.table import read_table
from fedaiot.tasks import ArrayData, Task

LABEL = "label"
MIN_EXAMPLES = 2
ANY = 1e30  # a built-in task declares no valid range: any finite number


class LocalDataError(BadInputError):
    """The institution's data does not match the task's schema (one line, names the fault)."""

    reason = "data-error"  # the code a node sends on the wire instead of the text


class TabularSchema(BaseModel):
    """What a CSV or Parquet file must hold for a tabular task."""

    kind: Literal["tabular"] = "tabular"
    task: str
    features: list[str]
    label: str = LABEL
    classes: list[str]
    formats: list[str] = [".csv", ".parquet", ".npz"]


class ArraySchema(BaseModel):
    """What an array file or a class-folder layout must hold for an image or sensor task."""

    kind: Literal["array"] = "array"
    task: str
    sample_shape: list[int]
    classes: list[str]
    formats: list[str] = [".npz", "<folder>/<class>/<sample>.npy"]


def schema_of(task: Task) -> TabularSchema | ArraySchema:
    if task.feature_names is not None and len(task.input_shape) == 1:
        return TabularSchema(
            task=task.name, features=list(task.feature_names), classes=list(task.class_names)
        )
    return ArraySchema(
        task=task.name, sample_shape=list(task.input_shape), classes=list(task.class_names)
    )


def load_local(task: Task, path: Path) -> ArrayData:
    """The institution's raw (un-normalized) data, or LocalDataError naming what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LocalDataError(f"data {path} does not exist")
    schema = schema_of(task)
    suffix = path.suffix.lower()
    if path.is_dir():
        data = _read_folder(task, path)
    elif suffix == ".npz":
        data = _read_npz(task, path)
    elif suffix in (".csv", ".parquet") and isinstance(schema, TabularSchema):
        data = _read_table(task, schema, path)
    else:
        raise LocalDataError(
            f"{path}: unsupported format {suffix or '(none)'} for task {task.name}: "
            f"use {', '.join(schema.formats)}"
        )
    if len(data) < MIN_EXAMPLES:
        raise LocalDataError(f"{path}: {len(data)} examples, a node needs at least {MIN_EXAMPLES}")
    return data


# --- labels -----------------------------------------------------------------------------------


def _labels(task: Task, values: list[Any], where: str) -> np.ndarray:
    """Class names or indices to indices; the first unknown value is named with its row."""
    lookup = {name: i for i, name in enumerate(task.class_names)}
    lookup.update({str(i): i for i in range(task.num_classes)})
    out = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        key = _label_key(value)
        if key not in lookup:
            raise LocalDataError(
                f"{where}: unknown class {value!r} at row {row + 1} (task {task.name} has "
                f"classes {', '.join(task.class_names)}, or indices 0..{task.num_classes - 1})"
            )
        out[row] = lookup[key]
    return out


def _label_key(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, float | np.floating) and math.isfinite(value) and value == int(value):
        value = int(value)  # "1.0" from a float column is class 1
    return str(value).strip() if value is not None else ""


# --- tables -----------------------------------------------------------------------------------


def study_of_task(task: Task) -> Study:
    """A built-in tabular task's table described as a study: one reader, one set of checks,
    for a hospital's own study and for a built-in task's file alike."""
    names = list(task.feature_names or [])
    return Study(
        study=Header(id=task.name, version=1, title=task.description),
        label=Label(
            column=LABEL,
            classes=list(task.class_names),
            positive=task.class_names[task.positive_class] if task.num_classes == 2 else None,
            codings={str(i): name for i, name in enumerate(task.class_names)},
        ),
        features=[Feature(name=n, kind="numeric", range=(-ANY, ANY)) for n in names],
        quality=Quality(min_examples=MIN_EXAMPLES, min_per_class=1, max_examples=10**9),
    )


def _read_table(task: Task, schema: TabularSchema, path: Path) -> ArrayData:
    try:
        table = read_table(study_of_task(task), path)
    except StudyError as exc:
        raise LocalDataError(str(exc)) from None
    x = np.column_stack([table.columns[name] for name in schema.features]).astype(np.float32)
    return ArrayData(x=x, y=table.labels)


# --- arrays -----------------------------------------------------------------------------------


def _read_npz(task: Task, path: Path) -> ArrayData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise LocalDataError(
                    f"{path}: needs arrays 'x' and 'y', found {', '.join(archive.files) or 'none'}"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, LocalDataError):
            raise
        raise LocalDataError(f"{path}: unreadable .npz file: {exc}") from None
    shape = tuple(task.input_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise LocalDataError(
            f"{path}: x has shape {tuple(x.shape)}, task {task.name} expects "
            f"(n, {', '.join(map(str, shape))})"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise LocalDataError(
            f"{path}: y has shape {tuple(y.shape)}, expected ({x.shape[0]},): one label per sample"
        )
    return ArrayData(x=_finite(x, f"{path}: x"), y=_labels(task, y.tolist(), f"{path}: y"))


def _finite(x: np.ndarray, where: str) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise LocalDataError(f"{where} must be numeric, got dtype {x.dtype}")
    values = x.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(values), -1).any(axis=1))[0])
        raise LocalDataError(
            f"{where} has {int(bad.sum())} missing or non-finite values (first in sample {first})"
        )
    return values


def _read_folder(task: Task, root: Path) -> ArrayData:
    known = set(task.class_names)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in known]
    if unknown:
        raise LocalDataError(
            f"{root}: folder {unknown[0]!r} is not a class of task {task.name} "
            f"({', '.join(task.class_names)})"
        )
    samples: list[np.ndarray] = []
    labels: list[int] = []
    shape = tuple(task.input_shape)
    for folder in folders:
        for file in sorted(folder.glob("*.npy")):
            try:
                sample = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise LocalDataError(f"{file}: unreadable .npy file: {exc}") from None
            if tuple(sample.shape) != shape:
                raise LocalDataError(
                    f"{file}: sample has shape {tuple(sample.shape)}, task {task.name} "
                    f"expects {shape}"
                )
            samples.append(_finite(sample[None], str(file)))
            labels.append(task.class_names.index(folder.name))
    if not samples:
        raise LocalDataError(f"{root}: no <class>/<sample>.npy files found")
    return ArrayData(x=np.concatenate(samples), y=np.asarray(labels, dtype=np.int64))
