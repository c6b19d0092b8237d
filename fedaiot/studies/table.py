"""An institution's table (CSV or Parquet), read and checked against its study.

Every problem is refused before anything trains, with one line that names it: a missing
column, a value outside its range or its levels, a missing value under a ``refuse`` policy, a
label the study does not know, 0/1 labels the study did not map to its classes (which of 0 and
1 is the positive class would be a guess), a semicolon-delimited file, too few examples, too
few of a class, or more examples than one node may carry. Columns the study does not name are
ignored (and listed), so a hospital can keep its ids next to the features.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedaiot.studies.spec import Feature, Study, StudyError

NA = {"", "na", "n/a", "nan", "null", "none", "?", "."}
TRUE, FALSE = {"1", "true", "t", "yes", "y"}, {"0", "false", "f", "no", "n"}


@dataclass(frozen=True)
class StudyTable:
    """The study's columns: numeric values (NaN for missing), categorical level indices (-1
    for missing) and booleans (0/1, NaN for missing), and the class index of each row."""

    study: Study
    columns: dict[str, np.ndarray]
    labels: np.ndarray
    ignored: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def raw(self) -> np.ndarray:
        """One float64 row per record: the study's columns in order (for hashing records)."""
        if not len(self):
            return np.empty((0, len(self.study.features)))
        return np.column_stack(
            [self.columns[f.name].astype(np.float64) for f in self.study.features]
        )

    def take(self, rows: np.ndarray) -> StudyTable:
        columns = {name: values[rows] for name, values in self.columns.items()}
        return StudyTable(self.study, columns, self.labels[rows], self.ignored)

    def test_rows(self, split: str = "test") -> np.ndarray:
        """The rows of the local test split: a record is held out when a hash of the record
        (and the study's public split seed) falls below ``test_fraction``. Each record's side
        depends on that record alone, so adding or removing one moves no other. ``split =
        "validation"`` draws a second, independent hold-out (from the training rows, when
        tuning)."""
        salt = f"fedaiot-{split}/1:{self.study.key}:{self.study.evaluation.seed}".encode()
        raw, labels = self.raw(), self.labels
        draws = np.array(
            [
                int.from_bytes(
                    hashlib.sha256(salt + row.tobytes() + int(y).to_bytes(8, "big")).digest()[:8],
                    "big",
                )
                / 2**64
                for row, y in zip(raw, labels, strict=True)
            ]
        )
        return draws < self.study.evaluation.test_fraction

    def class_counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.study.label.classes)}


def read_table(study: Study, path: Path, *, site: tuple[str, str] | None = None) -> StudyTable:
    """The rows of ``path`` as the study's columns (``site``: only rows whose column ``site[0]``
    equals ``site[1]``, for simulating a multi-site file); StudyError naming the fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise StudyError(f"data {path} does not exist")
    table = open_table(path)
    names = [str(c) for c in table.column_names]
    if site is not None:
        if site[0] not in names:
            raise StudyError(f"{path}: no site column {site[0]!r}")
        keep = [str(v) == site[1] for v in table.column(site[0]).to_pylist()]
        table = table.filter(keep)
    wanted = [f.name for f in study.features] + [study.label.column]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise StudyError(
            f"{path}: missing column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
            f"(study {study.key} needs {len(study.features)} features and "
            f"{study.label.column!r}; see `fedaiot study check`)"
        )
    duplicated = sorted({c for c in wanted if names.count(c) > 1})
    if duplicated:
        raise StudyError(f"{path}: column{'s' * (len(duplicated) > 1)} {duplicated} appear twice")
    columns = {
        f.name: _column(f, table.column(f.name).to_pylist(), f"{path}: column {f.name!r}")
        for f in study.features
    }
    labels = _labels(study, table.column(study.label.column).to_pylist(), path)
    ignored = [c for c in names if c not in wanted and (site is None or c != site[0])]
    checked = StudyTable(study, columns, labels, ignored)
    _check_quality(checked, path)
    return checked


def open_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix != ".csv":
            raise StudyError(
                f"{path}: unsupported format {suffix or '(none)'}: use .csv or .parquet"
            )
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            header = handle.readline()
        if header.count(";") > header.count(","):
            raise StudyError(
                f"{path} is semicolon-delimited (as spreadsheets save CSV in some locales): "
                "save it with commas, or as Parquet"
            )
        # Every column as text: "NA", "m" and "007" are parsed by the study, not guessed.
        names = next(csv.reader([header]), [])
        strings = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=True
        )
        return pacsv.read_csv(path, convert_options=strings)
    except (pa.ArrowInvalid, OSError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise StudyError(f"{path}: unreadable {suffix} file: {first}") from None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip()


def _column(feature: Feature, values: list[Any], where: str) -> np.ndarray:
    kind = feature.kind
    out = np.full(len(values), -1 if kind == "categorical" else math.nan)
    for row, value in enumerate(values):
        text = _text(value)
        if text.lower() in NA:
            if feature.missing == "refuse":
                raise StudyError(
                    f"{where}: missing value at row {row + 1}, and the study refuses missing "
                    f'{feature.name!r} (missing = "refuse"; set "impute" to allow it)'
                )
            continue
        out[row] = _parse(feature, text, f"{where}, row {row + 1}")
    return out.astype(np.int64) if kind == "categorical" else out


def _parse(feature: Feature, text: str, where: str) -> float:
    if feature.kind == "categorical":
        if text not in feature.levels:
            raise StudyError(f"{where}: {text!r} is not one of the levels {feature.levels}")
        return float(feature.levels.index(text))
    if feature.kind == "boolean":
        lowered = text.lower()
        if lowered in TRUE or lowered in FALSE:
            return 1.0 if lowered in TRUE else 0.0
        raise StudyError(f"{where}: {text!r} is not a boolean (true/false, yes/no, 1/0)")
    try:
        number = float(text)
    except ValueError:
        raise StudyError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise StudyError(f"{where}: {text!r} is not a finite number")
    assert feature.range is not None
    low, high = feature.range
    if not low <= number <= high:
        unit = f" {feature.unit}" if feature.unit else ""
        raise StudyError(
            f"{where}: {text}{unit} is outside the study's range [{low:g}, {high:g}]{unit}"
        )
    return number


def _labels(study: Study, values: list[Any], path: Path) -> np.ndarray:
    label = study.label
    texts = [_text(v) for v in values]
    unknown = sorted({t for t in texts if t not in label.classes and t not in label.codings})
    if unknown and set(unknown) <= {"0", "1", "0.0", "1.0"}:
        raise StudyError(
            f"{path}: column {label.column!r} holds 0/1, but the study's classes are "
            f"{label.classes}: which of 0 and 1 means {label.classes[label.positive_index]!r} "
            "would be a guess; map them in the study's [label] codings"
        )
    if unknown:
        row = next(i for i, t in enumerate(texts) if t in unknown)
        shown = "an empty value" if unknown[0] == "" else repr(unknown[0])
        raise StudyError(
            f"{path}: column {label.column!r} holds {shown} at row {row + 1}, not one of the "
            f"classes {label.classes}"
        )
    index = {c: i for i, c in enumerate(label.classes)}
    return np.array([index[label.codings.get(t, t)] for t in texts], dtype=np.int64)


def _check_quality(table: StudyTable, path: Path) -> None:
    quality = table.study.quality
    if len(table) < quality.min_examples:
        raise StudyError(
            f"{path}: {len(table)} examples, the study needs at least {quality.min_examples} a node"
        )
    if len(table) > quality.max_examples:
        raise StudyError(
            f"{path}: {len(table)} examples, more than the {quality.max_examples} one node may "
            "carry in this study (max_examples): no node may outweigh the others"
        )
    counts = table.class_counts()
    scarce = {c: n for c, n in counts.items() if n < quality.min_per_class}
    if scarce:
        present = [c for c, n in counts.items() if n]
        kind = "one class only" if len(present) == 1 else "too few examples of a class"
        raise StudyError(
            f"{path}: {kind}: {counts} (the study needs at least {quality.min_per_class} of "
            "each class a node)"
        )
