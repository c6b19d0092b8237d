"""A predict request body, from bytes to a checked float32 batch, or an ``InputError``.

The body is ``{"instances": [...]}``. It is read one instance at a time (``raw_decode``), so the
row limit stops the parse at the first instance too many, however many follow, and each
instance is one short call that lets other threads in between. Then every value must be a
finite number within the range the model was trained on: at most ``input_range_stds`` standard
deviations from the manifest's training mean (or, for a model without such statistics, at most
``input_abs_max`` in absolute value). Errors name the instance and the model's feature, never
the caller's own text.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from fedaiot.errors import BadInputError
from fedaiot.serving.models import LoadedModel
from fedaiot.serving.reasons import BAD_INPUT, OUT_OF_RANGE

_DECODER = json.JSONDecoder()  # NaN and Infinity parse, and are refused below by name
_SPACE = " \t\n\r"
_LOC: tuple[str | int, ...] = ("body", "instances")


class InputError(BadInputError):
    """A prediction request that does not match the model's input schema."""

    def __init__(
        self, message: str, loc: tuple[str | int, ...] = _LOC, reason: str = BAD_INPUT
    ) -> None:
        super().__init__(message)
        self.loc = loc
        self.reason = reason


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def skip(self) -> str:
        """Skip whitespace; the next character ("" at the end)."""
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1
        return self.text[self.pos : self.pos + 1]

    def expect(self, char: str, what: str) -> None:
        if self.skip() != char:
            raise InputError(f"body is not valid JSON: expected {what} at byte {self.pos}", ())
        self.pos += 1

    def value(self) -> Any:
        self.skip()
        try:
            value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise InputError(f"body is not valid JSON: {exc.msg} at byte {exc.pos}", ()) from None
        except (ValueError, RecursionError):  # an integer of > 4300 digits, deep nesting
            raise InputError(
                f"body holds a value too large or too deep at byte {self.pos}", ()
            ) from None
        return value


def parse_body(data: bytes, max_batch: int) -> list[Any]:
    """The instances of a body, at most ``max_batch`` of them (refused as soon as there are
    more); each still unchecked."""
    try:
        reader = _Reader(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError("body is not UTF-8 JSON", ()) from None
    reader.expect("{", "an object {")
    instances: list[Any] | None = None
    if reader.skip() != "}":
        while True:
            if reader.skip() != '"':
                raise InputError(f"body is not valid JSON: expected a key at byte {reader.pos}")
            if reader.value() != "instances":
                raise InputError("the body takes one field, instances: no other", ("body",))
            if instances is not None:
                raise InputError("instances is given twice", ("body",))
            reader.expect(":", "':'")
            instances = _instances(reader, max_batch)
            if reader.skip() != ",":
                break
            reader.pos += 1
    reader.expect("}", "'}'")
    if reader.skip():
        raise InputError(f"body is not valid JSON: extra data at byte {reader.pos}", ())
    if instances is None:
        raise InputError("Field required: the body needs instances", _LOC)
    if not instances:
        raise InputError("instances is empty: send at least one instance")
    return instances


def _instances(reader: _Reader, max_batch: int) -> list[Any]:
    reader.expect("[", "a list of instances [")
    found: list[Any] = []
    if reader.skip() == "]":
        reader.pos += 1
        return found
    while True:
        found.append(reader.value())
        if len(found) > max_batch:
            raise InputError(
                f"batch too large: more than {max_batch} instances, the maximum is {max_batch}"
            )
        char = reader.skip()
        reader.pos += 1
        if char == "]":
            return found
        if char != ",":
            raise InputError(f"body is not valid JSON: expected ',' or ']' at byte {reader.pos}")


def to_batch(
    instances: list[Any], model: LoadedModel, range_stds: float, abs_max: float
) -> np.ndarray:
    """The (n, *shape) float32 batch of checked instances, or InputError naming the problem."""
    if model.encoder is not None:
        from fedaiot.serving.study_inputs import study_batch

        return study_batch(instances, model.encoder)
    rows = [_row(i, row, model) for i, row in enumerate(instances)]
    try:
        x = np.asarray(rows, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        i = next(i for i, row in enumerate(rows) if not _fits(row))
        raise InputError(f"instance {i} holds a number beyond float64", (*_LOC, i)) from None
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        what = "NaN" if math.isnan(x[i, j]) else "infinite"
        raise InputError(
            f"instance {i}, {_feature(model, j)} is {what}: values must be finite numbers",
            (*_LOC, i),
        )
    batch = x.reshape((len(rows), *model.shape))
    if model.mean is not None and model.std is not None:
        far = np.abs(batch - model.mean) > range_stds * model.std
        bound = f"more than {range_stds:g} standard deviations from the training mean"
    else:
        far = np.abs(batch) > abs_max
        bound = f"beyond +-{abs_max:g}"
    if far.any():
        i, j = (int(v) for v in np.argwhere(far.reshape(len(rows), -1))[0])
        raise InputError(
            f"instance {i}, {_feature(model, j)} is outside the range the model was trained "
            f"on ({bound})",
            (*_LOC, i),
            OUT_OF_RANGE,
        )
    return batch.astype(np.float32)


def _fits(row: list[float]) -> bool:
    try:
        np.asarray(row, dtype=np.float64)
    except OverflowError:
        return False
    return True


def _row(i: int, row: Any, model: LoadedModel) -> list[float]:
    loc: tuple[str | int, ...] = (*_LOC, i)
    if isinstance(row, dict):
        row = _from_features(i, row, model)
    elif not isinstance(row, list):
        raise InputError(f"instance {i} is neither a list of numbers nor an object", loc)
    elif len(row) != model.size:
        raise InputError(
            f"wrong shape: instance {i} has {len(row)} values, expected {model.size} "
            f"(input shape {list(model.shape)}, flattened)",
            loc,
        )
    for j, value in enumerate(row):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(
                f"instance {i}, {_feature(model, j)}: input should be a valid number", loc
            )
    return row


def _feature(model: LoadedModel, j: int) -> str:
    if model.feature_names is not None:
        return f"feature {model.feature_names[j]!r}"
    return f"value {j}"


def _from_features(i: int, row: dict[str, Any], model: LoadedModel) -> list[Any]:
    names = model.feature_names
    loc: tuple[str | int, ...] = (*_LOC, i)
    if names is None:
        raise InputError(
            f"wrong shape: instance {i} is an object, but this model has no feature names: "
            f"send a list of {model.size} numbers",
            loc,
        )
    unknown = len(set(row) - set(names))
    if unknown:  # counted, not named: the names are the caller's text
        raise InputError(
            f"instance {i} has {unknown} unknown feature name(s): the model's features are "
            f"listed in its input schema",
            loc,
        )
    missing = [name for name in names if name not in row]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"instance {i} lacks the features {missing[:5]}{more}", loc)
    return [row[name] for name in names]
