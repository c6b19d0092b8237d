"""No caller without a token can stall the service; oversized, slow and malformed requests are
refused early. Over real uvicorn servers on loopback: a ``fedaiot serve`` subprocess for the
availability measurement (no GIL shared with the clients), in-process servers for the rest."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving_support import (
    Keys,
    LiveServer,
    ServeProcess,
    auth,
    instance,
    make_keys,
    make_registry,
    raw_exchange,
    settings_for,
    status_of,
)

BIG_ROWS = 100_000  # about 6 MB of JSON, as the attack in issue 11
BIG_BODY = json.dumps({"instances": [[1] * 30] * BIG_ROWS}, separators=(",", ":")).encode()


def _head(length: int, token: str | None = None, path: str = "/v1/predict") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("registry")
    make_registry(root, keys.private)
    live = LiveServer(
        settings_for(root, keys, header_timeout_seconds=1.0, body_timeout_seconds=1.0)
    )
    yield live
    live.stop()


def test_big_body_is_refused_before_it_is_sent(server: LiveServer, keys: Keys) -> None:
    """Only the headers and 64 KiB of a 6 MB body are sent, and the answer comes anyway: the
    server did not wait for (let alone parse) the body. Without a token: 401; with one, 413
    (the token is checked first, so the audit row names who sent it)."""
    assert 6_000_000 < len(BIG_BODY) < 7_000_000
    for token, status in ((None, 401), (auth(keys, "clinician")["Authorization"][7:], 413)):
        answer = raw_exchange(server.url, _head(len(BIG_BODY), token), BIG_BODY[:65536])
        assert status_of(answer) == status, answer[:200]
        assert b"connection: close" in answer.lower()


def test_with_a_token_the_row_limit_stops_the_parse(tmp_path: Path, keys: Keys) -> None:
    """A body under the byte limit but over the row limit: 422 naming the limit."""
    make_registry(tmp_path / "registry", keys.private)
    live = LiveServer(settings_for(tmp_path / "registry", keys, max_body_bytes=16 << 20))
    try:
        response = httpx.post(
            live.url + "/v1/predict", content=BIG_BODY, headers=auth(keys, "clinician"), timeout=60
        )
        assert response.status_code == 422
        assert "batch too large: more than 256" in response.text
    finally:
        live.stop()


def test_healthz_stays_fast_while_tokenless_clients_upload_6_mb(tmp_path: Path, keys: Keys) -> None:
    """Two clients upload 6 MB bodies without a token, in a loop, as in issue 11 (where each
    one held the event loop for about a second). The limit is set above 6 MB, so these are
    refused by the token check (401), not by their size. Meanwhile /healthz is probed."""
    make_registry(tmp_path / "registry", keys.private)
    served = ServeProcess(tmp_path / "registry", keys, max_body_bytes=8 << 20)
    try:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            for _ in range(20):  # warm-up: connection, first-request paths
                client.get("/healthz").raise_for_status()
            stop, answered = threading.Event(), threading.Event()
            statuses: list[int | None] = []

            def upload() -> None:
                for _ in range(500):  # bounded, and stopped when the probes are done
                    if stop.is_set():
                        return
                    answer = raw_exchange(served.url, _head(len(BIG_BODY)), BIG_BODY, timeout=30)
                    statuses.append(status_of(answer))
                    answered.set()

            uploaders = [threading.Thread(target=upload) for _ in range(2)]
            for thread in uploaders:
                thread.start()
            try:
                assert answered.wait(60), "no upload was answered"
                probes = []
                for _ in range(31):
                    started = time.perf_counter()
                    client.get("/healthz").raise_for_status()
                    probes.append(time.perf_counter() - started)
                    time.sleep(0.01)
            finally:
                stop.set()
                for thread in uploaders:
                    thread.join(60)
    finally:
        served.stop()
    median = statistics.median(probes)
    print(f"healthz median {median * 1e3:.2f} ms, max {max(probes) * 1e3:.2f} ms, during")
    print(f"{len(statuses)} uploads: {sorted(set(statuses), key=str)}")
    # 401 for the token; 429 once this address has had too many of those.
    assert {s for s in statuses if s is not None} <= {401, 429}
    assert len(statuses) >= 2
    # Issue 11's goal is 50 ms (measured: 2-3 ms); the ceiling is wider so that a loaded
    # 2-core CI box does not flake. Before the fix this median was 350 ms.
    assert median < 0.1


def _connection_rows(server: LiveServer, keys: Keys, reason: str) -> list[dict]:
    query = f"/v1/audit?reason={reason}&limit=100"
    return httpx.get(server.url + query, headers=auth(keys, "auditor")).json()["entries"]


def test_oversized_headers_get_431(server: LiveServer, keys: Keys) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    assert status_of(raw_exchange(server.url, head)) == 431
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(400))
    answer = raw_exchange(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status_of(answer) == 431
    assert httpx.get(server.url + "/healthz").status_code == 200  # normal headers still fine
    rows = _connection_rows(server, keys, "headers_too_large")
    assert len(rows) == 2
    assert all((r["endpoint"], r["status"], r["client"]) == ("(connection)", 431, "127.0.0.1")
               for r in rows)  # fmt: skip


def test_half_sent_headers_are_cut_off(server: LiveServer, keys: Keys) -> None:
    """A client that never finishes its headers is answered 408 and closed (here after the
    1 s configured; the default is 10 s), even if it keeps sending a byte now and then."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
        sock.settimeout(30)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = b""
        for _ in range(60):  # a byte every 0.2 s: each one would re-arm a keep-alive timer
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
            sock.setblocking(False)
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                pass
            except OSError:
                break
            finally:
                sock.setblocking(True)
            if answer:
                break
    assert status_of(answer) == 408
    assert time.monotonic() - started < 10
    assert _connection_rows(server, keys, "header_timeout")


def test_a_body_that_stalls_gets_408(server: LiveServer, keys: Keys) -> None:
    token = auth(keys, "clinician")["Authorization"].split()[1]
    body = json.dumps({"instances": [instance()]}).encode()
    answer = raw_exchange(server.url, _head(len(body), token), body[:20], timeout=30)
    assert status_of(answer) == 408


def test_a_chunked_body_is_counted_while_it_streams(tmp_path: Path, keys: Keys) -> None:
    make_registry(tmp_path / "registry", keys.private)
    live = LiveServer(settings_for(tmp_path / "registry", keys, max_body_bytes=4096))
    try:

        def chunks() -> Iterator[bytes]:
            for _ in range(1000):  # 100 KB in all, no Content-Length
                yield b" " * 100

        try:
            response = httpx.post(
                live.url + "/v1/predict", content=chunks(), headers=auth(keys, "clinician")
            )
            assert response.status_code == 413
        except httpx.HTTPError:  # the server may close before the client finished sending
            pass
        audit = httpx.get(live.url + "/v1/audit?limit=5", headers=auth(keys, "auditor"))
        row = next(e for e in audit.json()["entries"] if e["endpoint"] == "/v1/predict")
        assert (row["status"], row["reason"], row["subject"]) == (
            413,
            "body_too_large",
            "clinician-1",
        )
    finally:
        live.stop()


def test_forwarded_for_is_not_believed_by_default(server: LiveServer, keys: Keys) -> None:
    headers = {"X-Forwarded-For": "203.0.113.9"}
    assert httpx.get(server.url + "/v1/model", headers=headers).status_code == 401
    rows = httpx.get(
        server.url + "/v1/audit?limit=3&status=401", headers=auth(keys, "auditor")
    ).json()["entries"]
    assert rows and all(row["client"] == "127.0.0.1" for row in rows)
