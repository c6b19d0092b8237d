"""``fedaiot keys``, ``fedaiot token issue`` and ``fedaiot serve``: keys, tokens, startup errors."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.cli.serve import parse_ttl
from fedaiot.errors import BadInputError
from fedaiot.serving.auth import TokenError, TokenVerifier
from fedaiot.serving.settings import ServingSettings
from tests.serving_support import bound_socket, make_keys, make_registry
from tests.waiting import answers, wait_until

EXIT_STARTUP = BadInputError.exit_code

runner = CliRunner()


def test_keys_are_created_private_and_never_overwritten(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "--dir", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    private = tmp_path / "k" / "coordinator.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    before = private.read_bytes()
    again = runner.invoke(app, ["keys", "--dir", str(tmp_path / "k")])
    assert again.exit_code == EXIT_STARTUP and "already exists" in again.output
    assert private.read_bytes() == before
    forced = runner.invoke(app, ["keys", "--dir", str(tmp_path / "k"), "--force"])
    assert forced.exit_code == 0 and private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_issued_token_verifies_with_the_public_key(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    args = ["token", "issue", "--role", "device", "--subject", "pump-3", "--ttl", "15m"]
    result = runner.invoke(app, [*args, "--key", str(keys.private_path)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    settings = ServingSettings(registry=tmp_path, public_key=keys.public_path)
    principal = TokenVerifier(settings).verify(token)
    assert (principal.subject, principal.role) == ("pump-3", "device")
    other = make_keys(tmp_path / "other")
    with pytest.raises(TokenError, match="signature invalid"):
        TokenVerifier(ServingSettings(registry=tmp_path, public_key=other.public_path)).verify(
            token
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "root"], "unknown role 'root'"),
        (["--ttl", "soon"], "--ttl 'soon'"),
        (["--ttl", "400d"], "between 1 second and 366 days"),
    ],
)
def test_bad_token_requests_fail_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    keys = make_keys(tmp_path / "k")
    base = ["token", "issue", "--role", "clinician", "--subject", "a"]
    result = runner.invoke(app, [*base, "--key", str(keys.private_path), *args])
    assert result.exit_code == EXIT_STARTUP
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_ttl_units() -> None:
    assert [parse_ttl(t) for t in ("90", "90s", "15m", "8h", "2d")] == [90, 90, 900, 28800, 172800]


def _serve(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["serve", *args])
    return result.exit_code, result.output.strip()


def test_serve_startup_errors_are_one_line(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _serve("--registry", str(empty), "--public-key", str(keys.public_path))
    assert code == EXIT_STARTUP and "no model version in the registry" in out
    assert len(out.splitlines()) == 1
    make_registry(tmp_path / "registry", keys.private)
    code, out = _serve("--registry", str(tmp_path / "registry"), "--public-key", "nope.pub")
    assert code == EXIT_STARTUP and out == (
        "error: public key nope.pub not found (create a key pair with `fedaiot keys`)"
    )
    code, out = _serve("--registry", str(tmp_path / "registry"))
    assert code == EXIT_STARTUP and "exactly one of public_key" in out
    busy = bound_socket()
    try:
        port = str(busy.getsockname()[1])
        registry_args = ["--registry", str(tmp_path / "registry")]
        code, out = _serve(*registry_args, "--public-key", str(keys.public_path), "--port", port)
        assert code == EXIT_STARTUP and out == f"error: port {port} on 127.0.0.1 is already in use"
    finally:
        busy.close()


def test_fedaiot_serve_runs_uvicorn(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    make_registry(tmp_path / "registry", keys.private)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fedaiot", "serve", "--registry", str(tmp_path / "registry")]
    command += ["--public-key", str(keys.public_path), "--port", str(port), "--log-level", "error"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: answers(url), "fedaiot serve to answer", process=process)
        health = httpx.get(url, timeout=30)
        assert health.json() == {"status": "ok", "model_version": "bc-r0002"}
    finally:
        process.terminate()
        process.wait(10)
    assert process.returncode in (0, 130)
