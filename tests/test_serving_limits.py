"""Extraction and flooding: row rate limits, the daily row quota, rounding, per-address limits.

Over real uvicorn servers on loopback, with the default limits unless a test says otherwise.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedaiot.serving.settings import RateLimit
from tests.serving_support import (
    DATA,
    Keys,
    LiveServer,
    auth,
    make_keys,
    make_registry,
    settings_for,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def _rows(start: int, count: int) -> dict[str, Any]:
    """``count`` real records (cycling through the data set), as an extractor would send."""
    return {"instances": [DATA[(start + i) % len(DATA)].tolist() for i in range(count)]}


def _server(tmp_path: Path, keys: Keys, **settings: Any) -> LiveServer:
    registry = tmp_path / "registry"
    if not registry.exists():
        make_registry(registry, keys.private)
    return LiveServer(settings_for(registry, keys, **settings))


# Only the row *rate* is lifted, so that 16 batches back to back reach the daily quota.
FAST_ROWS = {"clinician": RateLimit(per_second=50, burst=100, rows_per_second=1e6, rows_burst=256)}


def test_an_extraction_of_4096_rows_hits_the_daily_quota(tmp_path: Path, keys: Keys) -> None:
    """Issue 11 copied the model with 16 requests of 256 rows. With the default quota (2,048
    rows a clinician a day) the 9th is refused, and the audit log counts the rows."""
    server = _server(tmp_path, keys, rate_limits=FAST_ROWS)
    try:
        headers = auth(keys, "clinician", "extractor")
        statuses = []
        for i in range(16):
            response = httpx.post(
                server.url + "/v1/predict", json=_rows(256 * i, 256), headers=headers
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert "daily row quota of role 'clinician' (2048 rows) reached" in response.text
        assert statuses == [200] * 8 + [429] * 8
        audit = httpx.get(
            server.url + "/v1/audit?subject=extractor&limit=100", headers=auth(keys, "auditor")
        ).json()["entries"]
        assert sum(row["rows"] or 0 for row in audit) == 2048
        refused = [row for row in audit if row["status"] == 429]
        assert refused and all(row["reason"] == "quota_exhausted" for row in refused)
    finally:
        server.stop()


def test_with_the_default_limits_a_patient_extractor_stops_at_2048_rows(
    tmp_path: Path, keys: Keys
) -> None:
    """All limits at their defaults; the extractor waits as Retry-After says when the row rate
    stops it (256 rows/s past a burst of 1,024), and is stopped for the day at 2,048 rows."""
    server = _server(tmp_path, keys)
    try:
        headers = auth(keys, "clinician", "patient")
        predicted, reasons = 0, []
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for i in range(40):  # 16 batches wanted; bounded whatever the server says
                response = client.post("/v1/predict", json=_rows(256 * i, 256))
                if response.status_code == 200:
                    predicted += 256
                    continue
                assert response.status_code == 429
                if "daily row quota" in response.text:
                    break
                reasons.append("row rate")
                time.sleep(min(5, int(response.headers["retry-after"])))
        assert predicted == 2048 and "daily row quota" in response.text
        assert reasons  # the row rate stopped it too, on the way
    finally:
        server.stop()


def test_the_quota_survives_a_restart(tmp_path: Path, keys: Keys) -> None:
    headers = auth(keys, "clinician", "restarter")
    server = _server(tmp_path, keys, rate_limits=FAST_ROWS)
    try:
        for i in range(6):
            ok = httpx.post(server.url + "/v1/predict", json=_rows(256 * i, 256), headers=headers)
            assert ok.status_code == 200
    finally:
        server.stop()
    server = _server(tmp_path, keys, rate_limits=FAST_ROWS)  # same registry, same audit log
    try:
        statuses = [
            httpx.post(server.url + "/v1/predict", json=_rows(0, 256), headers=headers).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]  # 6 + 2 batches = 2,048 rows
    finally:
        server.stop()


def test_rows_are_rate_limited_not_only_requests(tmp_path: Path, keys: Keys) -> None:
    server = _server(tmp_path, keys)
    try:
        headers = auth(keys, "device", "pump-1")  # device: 64 rows at once, 5 rows a second
        too_many = httpx.post(server.url + "/v1/predict", json=_rows(0, 65), headers=headers)
        assert too_many.status_code == 429
        assert "at most 64 rows at once" in too_many.json()["detail"]
        assert httpx.post(server.url + "/v1/predict", json=_rows(0, 64), headers=headers)
        again = httpx.post(server.url + "/v1/predict", json=_rows(0, 32), headers=headers)
        assert again.status_code == 429 and int(again.headers["retry-after"]) >= 1
        assert "row rate of role 'device' exceeded" in again.json()["detail"]
    finally:
        server.stop()


def test_probabilities_are_rounded(tmp_path: Path, keys: Keys) -> None:
    for decimals in (2, 4):
        server = _server(tmp_path, keys, probability_decimals=decimals)
        try:
            body = _rows(0, 20)
            for role in ("clinician", "admin"):
                answer = httpx.post(
                    server.url + "/v1/predict", json=body, headers=auth(keys, role, f"r{decimals}")
                ).json()
                for prediction in answer["predictions"]:
                    for p in prediction["probabilities"].values():
                        assert round(p, decimals) == p and 0.0 <= p <= 1.0
            device = httpx.post(server.url + "/v1/predict", json=body, headers=auth(keys, "device"))
            assert all("probabilities" not in p for p in device.json()["predictions"])
        finally:
            server.stop()


def test_callers_without_a_valid_token_are_limited_per_address(tmp_path: Path, keys: Keys) -> None:
    lenient = {"admin": RateLimit(per_second=1000, burst=1000)}
    unauthenticated = RateLimit(per_second=0.01, burst=5)
    server = _server(
        tmp_path,
        keys,
        rate_limits=lenient,
        unauthenticated_limit=unauthenticated,
        blocked_hold_seconds=0.5,
    )
    try:
        with httpx.Client(base_url=server.url) as client:
            statuses = [client.get("/v1/model").status_code for _ in range(8)]
            assert statuses == [401] * 5 + [429] * 3
            refused = client.get("/v1/model", headers={"Authorization": "Bearer forged"})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 1
            # A valid token from the same address is still served on its open connection...
            assert client.get("/v1/model", headers=auth(keys, "admin")).status_code == 200
            rows = client.get("/v1/audit?status=429", headers=auth(keys, "admin")).json()
            # ... but a new connection from the address is held unanswered, then dropped.
            started = time.monotonic()
            with pytest.raises(httpx.TransportError):
                httpx.get(server.url + "/healthz", timeout=30)
            assert time.monotonic() - started >= 0.4
            metrics = client.get("/metrics").text
        assert {row["reason"] for row in rows["entries"]} == {"unauthenticated_rate_limited"}
        assert 'fedaiot_connections_refused_total{reason="address_blocked"} 1.0' in metrics
    finally:
        server.stop()


def test_held_connections_are_capped(tmp_path: Path, keys: Keys) -> None:
    """Past ``blocked_hold_max`` held connections, the next ones are dropped at once."""
    server = _server(
        tmp_path,
        keys,
        unauthenticated_limit=RateLimit(per_second=0.01, burst=1),
        blocked_hold_seconds=30,
        blocked_hold_max=1,
    )
    port = int(server.url.rsplit(":", 1)[1])
    try:
        assert httpx.get(server.url + "/v1/model").status_code == 401  # the budget is spent
        held = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/healthz", timeout=30)
        assert time.monotonic() - started < 10  # dropped, not held for 30 s
        held.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the first one is still held: open, unanswered
            held.recv(1)
        held.close()
    finally:
        server.stop()
