"""Revoked tokens: a list signed with the coordinator's key, which the service follows.

``fedaiot token revoke --list revoked.json --jti J`` (one token, by the id the audit log shows)
or ``--subject S`` (every token of ``S`` issued up to now: a lost device, a clinician who left)
adds an entry, raises the list's ``serial`` and signs the file again (``revoked.json.sig``: hex
Ed25519 over the exact bytes, as a manifest's signature). The service (``revocation_list``)
refuses a listed token with 401 ``revoked``, cached verification or not.

Who can undo a revocation: only the holder of the coordinator's private key. The service keeps
the last list that verified and is not older (by ``serial``) than the one before: a list that
was edited, lost its signature, went back to an older signed version or disappeared changes
nothing, and is logged. A configured list that is missing or does not verify at start stops
the service from starting. It looks at the files at most once a second, so a revocation takes
effect within a second or two of the file being written.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedaiot.errors import BadInputError
from fedaiot.registry import signing
from fedaiot.registry.files import exclusive, replace

log = logging.getLogger(__name__)

FORMAT = "fedaiot-revocations/1"
_LOOK_EVERY_SECONDS = 1.0


class RevocationError(BadInputError):
    """A revocation list is missing, unreadable, unsigned, wrongly signed or older than the
    one it would replace."""


class Revocation(BaseModel):
    """One token (``jti``) or every token of a subject issued at or before ``revoked``."""

    model_config = ConfigDict(extra="forbid")
    jti: str | None = Field(default=None, min_length=1, max_length=128)
    subject: str | None = Field(default=None, min_length=1, max_length=256)
    revoked: int  # unix seconds
    reason: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _one_target(self) -> Revocation:
        if (self.jti is None) == (self.subject is None):
            raise ValueError("an entry names exactly one of jti or subject")
        return self


class RevocationList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    serial: int = Field(default=0, ge=0)
    entries: list[Revocation] = Field(default_factory=list)

    def index(self) -> Revoked:
        subjects: dict[str, int] = {}
        for entry in self.entries:
            if entry.subject is not None:
                subjects[entry.subject] = max(entry.revoked, subjects.get(entry.subject, 0))
        jtis = frozenset(e.jti for e in self.entries if e.jti is not None)
        return Revoked(self.serial, len(self.entries), jtis, subjects)


@dataclass(frozen=True)
class Revoked:
    """A list as the service asks it, once a request: a set and a map, not a scan."""

    serial: int
    entries: int
    jtis: frozenset[str]
    subjects: dict[str, int]  # subject -> the latest revocation's time

    def refuses(self, jti: str | None, subject: str, issued_at: int) -> bool:
        if jti is not None and jti in self.jtis:
            return True
        return issued_at <= self.subjects.get(subject, -1)


def signature_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def load_list(path: Path, key: Ed25519PublicKey) -> RevocationList:
    """The list at ``path``, its signature checked with ``key``."""
    try:
        data = path.read_bytes()
        signature = signature_path(path).read_text()
    except OSError as exc:
        raise RevocationError(f"revocation list {path}: {exc.strerror or exc}") from None
    try:
        signing.verify(key, data, signature)
    except signing.SigningError as exc:
        raise RevocationError(f"revocation list {path}: {exc}") from None
    try:
        revocations = RevocationList.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RevocationError(f"revocation list {path}: {where}: {first['msg']}") from None
    if revocations.format != FORMAT:
        raise RevocationError(f"revocation list {path}: not a {FORMAT} file")
    return revocations


def revoke(
    path: Path,
    key: Ed25519PrivateKey,
    *,
    jti: str | None = None,
    subject: str | None = None,
    reason: str = "",
    now: float | None = None,
) -> RevocationList:
    """Add an entry to the list at ``path`` (created when missing) and sign it again."""
    path = Path(path)
    revoked = int(time.time() if now is None else now)
    try:
        entry = Revocation(jti=jti, subject=subject, revoked=revoked, reason=reason)
    except ValidationError as exc:
        raise BadInputError(f"revocation: {exc.errors()[0]['msg']}") from None
    with exclusive(path.with_name(f".{path.name}.lock")):  # two revokes at once keep both
        current = load_list(path, key.public_key()) if path.exists() else RevocationList()
        updated = RevocationList(serial=current.serial + 1, entries=[*current.entries, entry])
        data = json.dumps(updated.model_dump(exclude_none=True), indent=2).encode()
        # The list first, then its signature: a reader in between sees a mismatch and keeps
        # the list it has (fail closed), then takes the new one at its next look.
        replace(path, data)
        replace(signature_path(path), signing.sign(key, data).encode())
    return updated


class RevocationWatch:
    """The service's view of the list: loaded at start, looked at again at most once a second,
    replaced only by a list that verifies and is not older."""

    def __init__(self, path: Path, key: Ed25519PublicKey) -> None:
        self._path, self._key = Path(path), key
        self._revoked = load_list(self._path, key).index()
        self._seen = self._stamp()
        self._looked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def serial(self) -> int:
        return self._revoked.serial

    def refuses(self, jti: str | None, subject: str, issued_at: int) -> bool:
        self._look()
        return self._revoked.refuses(jti, subject, issued_at)

    def _stamp(self) -> tuple[tuple[int, int] | None, ...]:
        def stat(path: Path) -> tuple[int, int] | None:
            try:
                info = path.stat()
            except OSError:
                return None
            return info.st_mtime_ns, info.st_size

        return stat(self._path), stat(signature_path(self._path))

    def _look(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._looked < _LOOK_EVERY_SECONDS:
                return
            self._looked = now
            stamp = self._stamp()
            if stamp == self._seen:
                return
            self._seen = stamp
            try:
                fresh = load_list(self._path, self._key)
            except RevocationError as exc:
                log.error("%s: kept serial %d (%d entries)", exc, *self._counts())
                return
            if fresh.serial < self._revoked.serial:  # a signed list from before: a rollback
                log.error(
                    "revocation list %s: serial %d is older than the loaded %d: kept the loaded",
                    self._path,
                    fresh.serial,
                    self._revoked.serial,
                )
                return
            self._revoked = fresh.index()
            log.info("revocation list %s: serial %d, %d entries", self._path, *self._counts())

    def _counts(self) -> tuple[int, int]:
        return self._revoked.serial, self._revoked.entries
