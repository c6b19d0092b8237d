"""Predictions off the event loop: parse, check, admit, run the model, format, in a thread pool.

One job does all of a request's heavy work in an inference thread (``inference_threads`` of
them, sized in the settings): the body's JSON, the range checks, the forward pass (torch
releases the GIL) and the response's JSON. The event loop only hands bytes over and back, so a
large batch never stalls ``/healthz`` or other callers. At most ``inference_queue`` jobs wait
for a thread; past that, 503.

Admission happens inside the job, once the row count is known: the role's row rate and the
subject's daily row quota. Probabilities are rounded to ``probability_decimals``, and a row
whose output is not finite is refused, never reported as the argmax of NaN.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedaiot.serving import reasons
from fedaiot.serving.auth import Principal
from fedaiot.serving.inputs import InputError, parse_body, to_batch
from fedaiot.serving.limits import DailyQuota, RateLimiter
from fedaiot.serving.models import LoadedModel
from fedaiot.serving.settings import ServingSettings

log = logging.getLogger(__name__)
_BYTES_PER_VALUE = 64  # a value in JSON, with its feature name: generous
_BODY_SLACK = 16 << 10


class Refusal(Exception):
    """A request refused by a limit: status, a message, the reason code, extra headers."""

    def __init__(
        self, status: int, detail: str, reason: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.reason = status, detail, reason
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Prediction:
    body: bytes
    rows: int


def body_limit(settings: ServingSettings, model: LoadedModel) -> int:
    """The largest predict body accepted: the setting, or enough for a full batch."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    return settings.max_batch * model.size * _BYTES_PER_VALUE + _BODY_SLACK


Observer = Callable[[LoadedModel, np.ndarray, np.ndarray], None]  # model, batch, labels


class Predictor:
    def __init__(
        self,
        settings: ServingSettings,
        limiter: RateLimiter,
        quota: DailyQuota,
        observer: Observer | None = None,
    ) -> None:
        """``observer`` sees each answered batch in the inference thread (monitoring counts
        and shadow scoring); it must not keep the batch."""
        self._settings = settings
        self._observer = observer
        self._limiter = limiter
        self._quota = quota
        self._pool = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="fedaiot-infer"
        )
        self._waiting = 0  # touched on the event loop only

    async def predict(self, body: bytes, model: LoadedModel, principal: Principal) -> Prediction:
        if self._waiting >= self._settings.inference_queue:
            detail = "server busy: too many predictions waiting"
            raise Refusal(503, detail, reasons.BUSY, {"Retry-After": "1"})
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._job, body, model, principal)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _job(self, body: bytes, model: LoadedModel, principal: Principal) -> Prediction:
        s = self._settings
        x = to_batch(parse_body(body, s.max_batch), model, s.input_range_stds, s.input_abs_max)
        self._admit(principal, len(x))
        probs = model.predict_proba(x)
        finite = np.isfinite(probs).all(axis=1)
        if not finite.all():
            i = int(np.argmin(finite))
            raise InputError(
                f"instance {i}: the model gives no finite output for these values",
                ("body", "instances", i),
                reasons.NO_FINITE_OUTPUT,
            )
        names = model.class_names
        best = probs.argmax(axis=1).tolist()
        if principal.can("probabilities"):
            rounded = np.round(probs.astype(np.float64), s.probability_decimals).tolist()
            predictions: list[dict[str, Any]] = [
                {"label": names[k], "class_index": k, "probabilities": _named(names, p)}
                for k, p in zip(best, rounded, strict=True)
            ]
        else:
            predictions = [{"label": names[k], "class_index": k} for k in best]
        answer = {"model_version": model.version, "predictions": predictions}
        body = json.dumps(answer, allow_nan=False).encode()
        if self._observer is not None:
            try:
                self._observer(model, x, np.asarray(best, dtype=np.int64))
            except Exception:  # monitoring must never fail a prediction
                log.exception("monitoring a predicted batch failed")
        return Prediction(body, len(x))

    def _admit(self, principal: Principal, rows: int) -> None:
        role, subject = principal.role, principal.subject
        limit = self._limiter.limit(role)
        wait = self._limiter.rows(role, subject, rows)
        if math.isinf(wait):
            raise Refusal(
                429,
                f"role {role!r} may predict at most {limit.rows_burst} rows at once",
                reasons.ROWS_RATE_LIMITED,
            )
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            raise Refusal(
                429,
                f"row rate of role {role!r} exceeded: retry in {retry} s",
                reasons.ROWS_RATE_LIMITED,
                {"Retry-After": retry},
            )
        check = self._quota.spend(role, subject, rows)
        if not check.allowed:
            raise Refusal(
                429,
                f"daily row quota of role {role!r} ({limit.rows_per_day} rows) reached: "
                f"{check.left} rows left today (UTC)",
                reasons.QUOTA_EXHAUSTED,
            )


def _named(names: list[str], values: list[float]) -> dict[str, float]:
    return dict(zip(names, values, strict=True))
