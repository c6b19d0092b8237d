"""The cryptographic primitives of the protocol, all from ``cryptography``.

* Key agreement: X25519 (RFC 7748) then HKDF-SHA256 (RFC 5869) with the round context as salt
  and a purpose label as ``info``, to 32 bytes. Distinct labels give independent keys from the
  same Diffie-Hellman secret (one for the share channel, one for the pairwise mask).
* Authenticated encryption: ChaCha20-Poly1305 (RFC 8439) with a random 96-bit nonce per message.
* Pseudorandom generator: the AES-256-CTR keystream under a 32-byte seed from a zero counter,
  read as little-endian ``uint64``. The output is indistinguishable from uniform to anyone who
  does not know the seed.

The guarantee of the PRG holds only if a seed is expanded for one purpose: the protocol derives
every seed per round (fresh key pairs and fresh self-mask seeds each round, and HKDF salted with
the round context), and expands each seed exactly once per round, so no keystream is ever reused
across rounds or purposes. Callers must keep it that way: never expand a seed of one round in
another, nor reuse a seed with a different length expecting an unrelated output (a shorter
expansion is a prefix of a longer one).
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedaiot.secagg.errors import AuthenticationError, ProtocolViolation, SecAggError
from fedaiot.secagg.quantize import ring_mask

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
ENC_INFO = b"fedaiot-secagg-enc"
MASK_INFO = b"fedaiot-secagg-mask"
GRAPH_INFO = b"fedaiot-secagg-graph"
_ZEROS = memoryview(bytes(1 << 20))  # the plaintext of the PRG keystream, 1 MiB at a time


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (from the OS CSPRNG)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw private key (to be secret-shared; never sent in the clear)."""
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """The X25519 private key of 32 raw bytes."""
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` to ``length`` bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def agree(private: X25519PrivateKey, peer_public_bytes: bytes, info: bytes, salt: bytes) -> bytes:
    """A 32-byte key shared with the holder of ``peer_public_bytes``.

    ``HKDF-SHA256(X25519(private, peer), salt=salt, info=info)``; both ends get the same key.
    ``salt`` must be the round context, so keys never repeat across rounds.
    """
    if len(peer_public_bytes) != KEY_BYTES:
        raise ProtocolViolation(f"an X25519 public key is {KEY_BYTES} bytes")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public_bytes))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise ProtocolViolation(f"peer public key is invalid: {exc}") from None
    return hkdf(shared, salt=salt, info=info)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption: ``nonce (12 B) || ciphertext || tag (16 B)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Decrypt a :func:`seal` output; :class:`AuthenticationError` if it does not verify.

    Verification fails when the ciphertext, the nonce or the associated data differ from what
    was sealed, or the key is wrong (another round, sender or recipient).
    """
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise AuthenticationError("share ciphertext failed authentication: too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data
        )
    except InvalidTag:
        raise AuthenticationError(
            "share ciphertext failed authentication (tampered with, replayed from another "
            "round, or addressed to another node)"
        ) from None


def expand(seed: bytes, length: int, modulus_bits: int = 64) -> npt.NDArray[np.uint64]:
    """``length`` pseudorandom elements of ``Z_{2^modulus_bits}`` from a 32-byte seed.

    The AES-256-CTR keystream (key = seed, counter block starting at zero) read as
    little-endian ``uint64`` and reduced to the low ``modulus_bits`` bits. Deterministic in
    ``seed``: both ends of a pairwise mask get the same vector.
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a PRG seed is {KEY_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise SecAggError(f"length must be >= 0, got {length}")
    nbytes = 8 * length
    buf = np.empty(nbytes + 16, dtype=np.uint8)  # update_into wants block_size - 1 spare bytes
    view = buf.data
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    pos = 0
    while pos < nbytes:  # encrypt a shared zero chunk at a time: no fresh zero pages per call
        step = min(len(_ZEROS), nbytes - pos)
        pos += encryptor.update_into(_ZEROS[:step], view[pos : pos + step + 15])
    out = buf[:nbytes].view("<u8")
    if out.dtype != np.uint64:  # big-endian host
        out = out.astype(np.uint64)
    if modulus_bits < 64:
        np.bitwise_and(out, ring_mask(modulus_bits), out=out)
    return out
