"""The coordinator's Ed25519 key: creation, PEM files, and signatures over manifest bytes.

One key pair signs both the registry's model manifests and the inference service's bearer
tokens. The private key is a PKCS#8 PEM file written with mode 0600 (``coordinator.key``); the
public key is a SubjectPublicKeyInfo PEM file (``coordinator.pub``). An existing key is never
overwritten unless asked (``force``).

A manifest signature is the raw 64-byte Ed25519 signature over the exact bytes of
``manifest.json``, stored as 128 lowercase hex characters and a newline in ``manifest.sig``.
Everything here is `cryptography`'s Ed25519; nothing is hand-rolled.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedaiot.errors import SecurityError

SIGNING_KEY_ENV = "FEDAIOT_SIGNING_KEY"  # path to the PEM private key that signs registrations
PRIVATE_KEY_FILE = "coordinator.key"
PUBLIC_KEY_FILE = "coordinator.pub"
SIGNATURE_BYTES = 64


class SigningError(SecurityError):
    """A key file is missing or unreadable, or a signature is missing, malformed or invalid."""


def generate_keypair(directory: Path, force: bool = False) -> tuple[Path, Path]:
    """Create ``coordinator.key`` (0600) and ``coordinator.pub`` in ``directory``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SigningError(f"cannot create {directory}: {exc.strerror}") from None
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise SigningError(f"{path} already exists: refusing to overwrite it (use force)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(private_path, private_pem, 0o600, force)
    _write(public_path, public_pem(key.public_key()), 0o644, force)
    return private_path, public_path


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write a file created with ``mode`` from the start (never world-readable on the way)."""
    if force and path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; the private key stays 0600


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SigningError(f"{what} {path} not found (create a key pair with `fedaiot keys`)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{what} {path} is unreadable: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file."""
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"private key {path} is not a readable PEM key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"private key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (a private key file also works: its public half)."""
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"public key {path} is not a readable PEM key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"public key {path} is not an Ed25519 key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: SHA-256 of its raw bytes, first 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """The signature file's text for ``data``: hex of the raw Ed25519 signature, newline."""
    return key.sign(data).hex() + "\n"


def verify(key: Ed25519PublicKey, data: bytes, signature_text: str) -> None:
    """Raise SigningError unless ``signature_text`` (as written by ``sign``) signs ``data``."""
    try:
        signature = bytes.fromhex(signature_text.strip())
    except ValueError:
        raise SigningError("signature is not hex") from None
    if len(signature) != SIGNATURE_BYTES:
        raise SigningError(f"signature has {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise SigningError(
            f"signature does not match (not signed by key {key_id(key)}, or altered since)"
        ) from None
