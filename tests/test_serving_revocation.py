"""Revoked tokens: refused by the running service within seconds, and a revocation cannot be
undone by anyone without the coordinator's private key (an edited, rolled-back or deleted list
changes nothing)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.errors import BadInputError
from fedaiot.registry.signing import generate_keypair, load_private_key
from fedaiot.serving import ServingStartupError, create_app
from fedaiot.serving.auth import issue_token
from fedaiot.serving.revocation import RevocationError, load_list, revoke, signature_path
from tests.serving_support import (
    Keys,
    LiveServer,
    ServeProcess,
    instance,
    make_keys,
    make_registry,
    settings_for,
)
from tests.waiting import run_together, wait_until

runner = CliRunner()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def registry(tmp_path: Path, keys: Keys) -> Path:
    return make_registry(tmp_path / "registry", keys.private).root


def _issue(keys: Keys, subject: str, role: str = "clinician", now: float | None = None) -> str:
    return issue_token(keys.private, subject=subject, role=role, ttl_seconds=600, now=now)


def _jti(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def _predict(url: str, token: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/predict",
        json={"instances": [instance()]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _revoked(url: str, token: str) -> bool:
    answer = _predict(url, token)
    return answer.status_code == 401 and answer.json()["detail"] == "token revoked"


def _cli_revoke(keys: Keys, listed: Path, *args: str) -> None:
    result = runner.invoke(
        app, ["token", "revoke", "--list", str(listed), "--key", str(keys.private_path), *args]
    )
    assert result.exit_code == 0, result.output


def test_the_running_service_refuses_revoked_tokens(
    tmp_path: Path, keys: Keys, registry: Path
) -> None:
    listed = tmp_path / "revoked.json"
    _cli_revoke(keys, listed, "--jti", "an-old-token", "--reason", "start the list")
    first, second = _issue(keys, "dr-alice"), _issue(keys, "dr-alice")
    device = _issue(keys, "sensor-17", role="device")
    server = ServeProcess(registry, keys, revocation_list=listed)
    try:
        for token in (first, second, device):  # verified, and now remembered by the service
            assert _predict(server.url, token).status_code == 200

        _cli_revoke(keys, listed, "--jti", _jti(first), "--reason", "laptop stolen")
        wait_until(lambda: _revoked(server.url, first), "the revoked token to be refused")
        assert _predict(server.url, second).status_code == 200  # only that token

        _cli_revoke(keys, listed, "--subject", "dr-alice", "--reason", "left the hospital")
        wait_until(lambda: _revoked(server.url, second), "the subject's tokens to be refused")
        assert _predict(server.url, device).status_code == 200
        revoked_at = load_list(listed, keys.private.public_key()).entries[-1].revoked
        later = _issue(keys, "dr-alice", now=revoked_at + 1)
        assert _predict(server.url, later).status_code == 200  # issued after: valid again

        admin = _issue(keys, "ops", role="admin")
        rows = httpx.get(
            server.url + "/v1/audit",
            params={"reason": "revoked"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).json()["entries"]
        assert {(r["subject"], r["status"]) for r in rows} == {("dr-alice", 401)}
        assert _jti(first) in {r["jti"] for r in rows}
    finally:
        server.stop()


@pytest.fixture
def live(
    tmp_path: Path, keys: Keys, registry: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[LiveServer, Path]]:
    caplog.set_level(logging.INFO, logger="fedaiot.serving.revocation")
    listed = tmp_path / "revoked.json"
    revoke(listed, keys.private, jti="an-old-token")
    server = LiveServer(settings_for(registry, keys, revocation_list=listed))
    yield server, listed
    server.stop()


def test_only_the_coordinators_key_can_undo_a_revocation(
    live: tuple[LiveServer, Path], keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, listed = live
    token = _issue(keys, "dr-bob")
    older = tmp_path / "older"
    older.mkdir()
    for path in (listed, signature_path(listed)):  # serial 1, properly signed
        shutil.copy(path, older / path.name)
    revoke(listed, keys.private, jti=_jti(token))  # serial 2
    wait_until(lambda: _revoked(server.url, token), "the revocation to take effect")

    def kept(event: str) -> None:
        """The service looks at the list when a token comes (at most once a second)."""
        caplog.clear()

        def looked() -> bool:
            assert _revoked(server.url, token)
            return event in caplog.text

        wait_until(looked, f"the service to log {event!r}")

    # Someone with write access to the file removes the entry; the signature no longer fits.
    edited = load_list(listed, keys.private.public_key()).model_copy(update={"entries": []})
    listed.write_text(edited.model_dump_json())
    kept("signature does not match")
    # They put back the older list, signed by the coordinator before the revocation.
    for name in (listed.name, signature_path(listed).name):
        shutil.copy(older / name, listed.parent / name)
    kept("older than the loaded 2")
    # They delete it.
    listed.unlink()
    signature_path(listed).unlink()
    kept("kept serial 2")
    # Another key signs a list without the entry.
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    revoke(listed, stranger, jti="someone-else")
    kept("signature does not match")


def test_a_configured_list_that_is_missing_or_not_signed_stops_the_start(
    tmp_path: Path, keys: Keys, registry: Path
) -> None:
    listed = tmp_path / "revoked.json"
    with pytest.raises(ServingStartupError, match=r"revocation list .*revoked.json"):
        create_app(settings_for(registry, keys, revocation_list=listed))
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    revoke(listed, stranger, subject="x")
    with pytest.raises(ServingStartupError, match="signature does not match"):
        create_app(settings_for(registry, keys, revocation_list=listed))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --jti or --subject"),
        (["--jti", "a", "--subject", "b"], "give exactly one of --jti or --subject"),
        (["--jti", "x" * 200], "revocation: String should have at most 128 characters"),
    ],
)
def test_revoke_names_bad_input(tmp_path: Path, keys: Keys, args: list[str], message: str) -> None:
    listed = tmp_path / "revoked.json"
    result = runner.invoke(
        app, ["token", "revoke", "--list", str(listed), "--key", str(keys.private_path), *args]
    )
    assert result.exit_code == BadInputError.exit_code, result.output
    assert message in result.output
    assert not listed.exists()  # nothing written


def test_revoking_with_another_key_leaves_the_list_as_it_was(tmp_path: Path, keys: Keys) -> None:
    listed = tmp_path / "revoked.json"
    revoke(listed, keys.private, subject="dr-carol")
    before = listed.read_bytes(), signature_path(listed).read_bytes()
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    with pytest.raises(RevocationError, match="signature does not match"):
        revoke(listed, stranger, jti="t")
    assert (listed.read_bytes(), signature_path(listed).read_bytes()) == before


def test_entries_name_one_target_and_serials_rise(tmp_path: Path, keys: Keys) -> None:
    listed = tmp_path / "revoked.json"
    serials: list[Any] = []
    for target in ({"jti": "t1"}, {"subject": "s1"}, {"jti": "t2"}):
        serials.append(revoke(listed, keys.private, now=time.time(), **target).serial)
    assert serials == [1, 2, 3]
    revocations = load_list(listed, keys.private.public_key())
    revoked = revocations.index()
    assert revoked.refuses("t2", "anyone", 0)
    assert revoked.refuses(None, "s1", revocations.entries[1].revoked)
    assert not revoked.refuses(None, "s1", revocations.entries[1].revoked + 1)
    assert not revoked.refuses("t3", "s2", 0)


REVOKES = """
from fedaiot.registry.signing import load_private_key
from fedaiot.serving.revocation import revoke
key = load_private_key(Path(sys.argv[3]))
for i in range(25):
    revoke(folder / "revoked.json", key, jti=f"{me}-{i}")
"""


def test_revocations_made_at_the_same_time_are_all_kept(tmp_path: Path, keys: Keys) -> None:
    run_together(REVOKES, tmp_path, 4, str(keys.private_path))
    revocations = load_list(tmp_path / "revoked.json", keys.private.public_key())
    assert revocations.serial == 100
    assert sorted(e.jti or "" for e in revocations.entries) == sorted(
        f"w{n}-{i}" for n in range(4) for i in range(25)
    )
