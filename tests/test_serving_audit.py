"""The audit log answers "who tried what": reasons, addresses and token ids on every row, subjects
whenever the token was valid, bounded under a flood, private files, and ``fedaiot audit``."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedaiot.cli.audit import parse_when
from fedaiot.cli.main import app as main_app
from fedaiot.serving.audit import AuditLog
from fedaiot.serving.audit_record import make_record
from fedaiot.serving.audit_sampling import RefusalSampler
from fedaiot.serving.settings import RateLimit
from tests.serving_support import (
    Keys,
    LiveServer,
    ServeProcess,
    auth,
    instance,
    make_keys,
    make_registry,
    settings_for,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def served(tmp_path: Path, keys: Keys) -> Iterator[tuple[LiveServer, Path]]:
    registry = make_registry(tmp_path / "registry", keys.private).root
    flood = RateLimit(per_second=1e6, burst=1_000_000)  # every tokenless call is a 401
    server = LiveServer(
        settings_for(
            registry,
            keys,
            unauthenticated_limit=flood,
            audit_refused_per_key=5,
            audit_refused_total=50,
        )
    )
    yield server, registry / "audit.sqlite3"
    server.stop()


def _entries(server: LiveServer, keys: Keys, query: str = "limit=1000") -> list[dict]:
    response = httpx.get(f"{server.url}/v1/audit?{query}", headers=auth(keys, "auditor", "aud"))
    assert response.status_code == 200, response.text
    return [e for e in response.json()["entries"] if e["subject"] != "aud"]


def test_refused_rows_say_why_from_where_and_which_token(
    served: tuple[LiveServer, Path], keys: Keys
) -> None:
    server, _ = served
    url = server.url + "/v1/predict"
    body = {"instances": [instance()]}
    forged_key = Ed25519PrivateKey.generate()
    forged = jwt.encode(
        {"sub": "mallory", "role": "admin", "jti": "forged-1", "iss": "fedaiot",
         "aud": "fedaiot-serving", "iat": int(time.time()), "exp": int(time.time()) + 60},
        forged_key, algorithm="EdDSA",
    )  # fmt: skip
    httpx.post(url, json=body)  # no token
    httpx.post(url, json=body, headers={"Authorization": f"Bearer {forged}"})  # forged admin
    httpx.post(url, json=body, headers={"Authorization": "Bearer a.b.c"})  # malformed
    httpx.post(url, content=b"{not json", headers=auth(keys, "clinician", "dr-typo"))
    httpx.get(server.url + "/v1/model", headers=auth(keys, "device", "pump-9"))
    rows = {row["reason"]: row for row in _entries(server, keys)}
    assert set(rows) >= {"missing_token", "bad_signature", "malformed_token", "bad_input"}
    assert "forbidden" in rows
    assert all(row["client"] == "127.0.0.1" for row in rows.values())
    # Refused before routing, yet named by the route template (never the caller's path text).
    assert rows["missing_token"]["endpoint"] == "/v1/predict"
    attempt = rows["bad_signature"]
    assert (attempt["status"], attempt["subject"], attempt["jti"]) == (401, None, "forged-1")
    assert "sub=mallory" in attempt["note"] and "role=admin" in attempt["note"]
    # A body that fails to parse is attributed: the token was checked before it was read.
    typo = rows["bad_input"]
    assert (typo["status"], typo["subject"], typo["role"]) == (422, "dr-typo", "clinician")
    assert typo["jti"] and len(typo["jti"]) == 32
    assert rows["forbidden"]["subject"] == "pump-9"


def test_a_tokenless_flood_adds_a_bounded_number_of_rows(
    served: tuple[LiveServer, Path], keys: Keys
) -> None:
    server, database = served
    calls = 400
    with httpx.Client(base_url=server.url) as client:
        for _ in range(calls):
            assert client.post("/v1/predict", json={"instances": []}).status_code == 401
        for _ in range(calls // 4):
            assert client.get("/v1/model", headers={"Authorization": "Bearer x"}).status_code == 401
    everything = _entries(server, keys)
    assert all(row["reason"] and row["client"] == "127.0.0.1" for row in everything)
    rows = [row for row in everything if row["status"] == 401]
    # 5 rows one by one per (address, status, reason, endpoint), the rest in aggregates.
    assert len(rows) <= 2 * 5 + 2 * 2
    assert sum(row["count"] for row in rows) == calls + calls // 4
    aggregate = next(row for row in rows if row["count"] > 1)
    assert aggregate["reason"] in ("missing_token", "malformed_token") and aggregate["client"]
    assert "not logged one by one" in aggregate["note"]
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT COUNT(*) FROM audit WHERE status = 401").fetchone()[0] == len(
            rows
        )


def test_the_sampler_is_bounded_whatever_arrives() -> None:
    sampler = RefusalSampler(window=60.0, per_key=3, total=20, max_keys=10, start=0.0)
    written = []
    for i in range(5000):  # 5,000 refusals from 500 addresses within one window
        record = make_record(
            request_id=str(i), method="GET", endpoint="/v1/model", status=401,
            duration_ms=0.1, client=f"10.0.{i % 500 // 256}.{i % 256}", reason="missing_token",
        )  # fmt: skip
        written += sampler.admit(record, now=1.0)
    written += sampler.drain(now=2.0, force=True)
    assert len(written) <= 20 + 10 + 1
    assert sum(row.count for row in written) == 5000
    later = make_record(request_id="x", method="GET", endpoint="/v1/model", status=401,
                        duration_ms=0.1, client="10.9.9.9", reason="missing_token")  # fmt: skip
    assert sampler.admit(later, now=100.0) == [later]  # a new window: written again


def test_the_audit_files_are_private(served: tuple[LiveServer, Path], keys: Keys) -> None:
    server, database = served
    httpx.get(server.url + "/v1/model")
    _entries(server, keys)
    files = [database, *database.parent.glob("audit.sqlite3-*")]
    assert {f.name for f in files} >= {"audit.sqlite3", "audit.sqlite3-wal", "audit.sqlite3-shm"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_an_older_database_is_migrated_and_made_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite3"
    with sqlite3.connect(path) as conn:  # the schema before issue 11
        conn.execute(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, "
            "unix REAL NOT NULL, request_id TEXT NOT NULL, subject TEXT, role TEXT, "
            "method TEXT NOT NULL, endpoint TEXT NOT NULL, model_version TEXT, rows INTEGER, "
            "status INTEGER NOT NULL, duration_ms REAL NOT NULL, note TEXT)"
        )
        conn.execute(
            "INSERT INTO audit (time, unix, request_id, subject, method, endpoint, status, "
            "duration_ms) VALUES ('t', 1.0, 'old', 'dr-old', 'GET', '/v1/model', 200, 1.0)"
        )
    path.chmod(0o644)
    log = AuditLog(path)
    row = make_record(request_id="new", method="GET", endpoint="/v1/model", status=401,
                      duration_ms=1.0, client="127.0.0.1", reason="missing_token")  # fmt: skip
    log.record(row)
    from fedaiot.serving.audit_query import AuditFilter

    rows = log.query(AuditFilter())
    log.close()
    assert [(r["request_id"], r["reason"], r["count"]) for r in rows] == [
        ("new", "missing_token", 1),
        ("old", None, 1),
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fedaiot_audit_queries_by_subject_status_reason_and_time(
    served: tuple[LiveServer, Path], keys: Keys
) -> None:
    server, database = served
    httpx.post(server.url + "/v1/predict", json={"instances": [instance()]},
               headers=auth(keys, "clinician", "dr-q"))  # fmt: skip
    other = make_keys(database.parent / "other-keys")
    httpx.get(server.url + "/v1/model", headers=auth(other, "admin", "mallory"))
    _entries(server, keys)  # flush
    registry = database.parent

    def lines(*args: str) -> list[dict]:
        result = runner.invoke(main_app, ["audit", str(registry), "--json", *args])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    assert [r["subject"] for r in lines("--subject", "dr-q")] == ["dr-q"]
    assert lines("--subject", "dr-q")[0]["rows"] == 1
    refused = lines("--status", "401")
    assert refused and {r["reason"] for r in refused} == {"bad_signature"}
    assert lines("--reason", "bad_signature") == refused
    assert lines("--since", "1h") and not lines("--until", "1h")
    assert lines("--since", "2000-01-01T00:00", "--limit", "1")[0]["subject"] == "aud"
    table = runner.invoke(main_app, ["audit", str(database), "--subject", "dr-q"])
    assert table.exit_code == 0 and "dr-q" in table.stdout and "reason" in table.stdout
    bad = runner.invoke(main_app, ["audit", str(registry), "--since", "yesterday"])
    assert bad.exit_code == 2 and "2h" in bad.output
    missing = runner.invoke(main_app, ["audit", str(registry / "nope.sqlite3")])
    assert missing.exit_code == 2 and "no audit database" in missing.output


def test_parse_when() -> None:
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_when("1970-01-02T00:00") == 86400.0
    assert parse_when("1970-01-02T01:00+01:00") == 86400.0
    with pytest.raises(ValueError, match="2h"):
        parse_when("soon")


def test_the_audit_command_does_not_load_torch() -> None:
    code = (
        "import sys; from fedaiot.cli.audit import audit; "
        "from fedaiot.serving import audit_query; "
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_another_process_writing_rows_leaves_the_services_log_whole(tmp_path: Path) -> None:
    """A campaign writes its rows into the service's audit database from its own process; the
    service went on failing every read ('disk I/O error') once that process closed it."""
    keys = make_keys(tmp_path / "keys")
    make_registry(tmp_path / "registry", keys.private)
    server = ServeProcess(tmp_path / "registry", keys)
    database = tmp_path / "registry" / "audit.sqlite3"
    write = (
        "import sys; from pathlib import Path; from fedaiot.serving.audit import AuditLog; "
        "from fedaiot.serving.audit_record import make_record; log = AuditLog(Path(sys.argv[1])); "
        "log.record(make_record(request_id='c', method='CLI', endpoint='(campaign)', status=201, "
        "duration_ms=1.0, reason='campaign_candidate')); log.close()"
    )
    try:
        clinician = auth(keys, "clinician")
        body = {"instances": [instance()]}
        assert httpx.post(f"{server.url}/v1/predict", json=body, headers=clinician).is_success
        subprocess.run([sys.executable, "-c", write, str(database)], check=True, timeout=120)
        assert httpx.post(f"{server.url}/v1/predict", json=body, headers=clinician).is_success
        answer = httpx.get(f"{server.url}/v1/audit", headers=auth(keys, "auditor"))
        assert answer.status_code == 200, answer.text
        reasons = [(e["endpoint"], e["reason"]) for e in answer.json()["entries"]]
        assert ("(campaign)", "campaign_candidate") in reasons
        assert reasons.count(("/v1/predict", "ok")) == 2
    finally:
        server.stop()
