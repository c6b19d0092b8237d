"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret of at most 64 bytes is read as an integer ``s < 2^512 < p`` and hidden as the constant
term of a random polynomial ``f`` of degree ``threshold - 1`` over ``GF(p)``, ``p = 2^521 - 1``
(a Mersenne prime). Share ``x`` is ``f(x)``, encoded as 66 bytes big-endian.

The guarantee. Any ``threshold - 1`` shares are independent of the secret (information-
theoretically: the coefficients come from :func:`secrets.randbelow`, uniform in ``GF(p)``);
any ``threshold`` shares determine it. :func:`combine` given *more* than ``threshold`` shares
also checks that the extra ones lie on the same polynomial, which detects a tampered share; given
exactly ``threshold`` shares it cannot, and a tampered share yields a wrong secret.

What the caller must do: use share ids ``1..n`` (never 0, which is the secret itself), send each
share only to its holder over an authenticated, encrypted channel, and pass the true
``secret_len`` to :func:`combine`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from fedaiot.secagg.errors import SecAggError

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64


def _check_ids(ids: Iterable[int]) -> list[int]:
    out = list(ids)
    for x in out:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise SecAggError(f"share id {x!r} must be an int in [1, p - 1]; 0 is the secret")
    if len(set(out)) != len(out):
        raise SecAggError(f"share ids must be distinct, got {sorted(out)}")
    return out


def _eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, threshold: int, share_ids: list[int]) -> dict[int, bytes]:
    """Split ``secret`` into one share per id; any ``threshold`` of them recover it."""
    if not isinstance(secret, bytes) or len(secret) > MAX_SECRET_BYTES:
        raise SecAggError(f"secret must be bytes of length <= {MAX_SECRET_BYTES}")
    ids = _check_ids(share_ids)
    if not 1 <= threshold <= len(ids):
        raise SecAggError(f"threshold {threshold} must lie in [1, {len(ids)} shares]")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in ids}


def _decode_share(x: int, share: bytes) -> int:
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise SecAggError(f"share {x} must be {SHARE_BYTES} bytes")
    y = int.from_bytes(share, "big")
    if y >= PRIME:
        raise SecAggError(f"share {x} is not an element of GF(2^521 - 1)")
    return y


def _lagrange_at(points: list[tuple[int, int]], x: int) -> int:
    """Value at ``x`` of the polynomial of degree ``len(points) - 1`` through ``points``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: dict[int, bytes], threshold: int, secret_len: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares ``{share_id: share}``.

    Raises :class:`SecAggError` if fewer than ``threshold`` shares are given, if a share is
    malformed, or (``"inconsistent shares: ..."``) if the shares beyond the first ``threshold``
    do not lie on the polynomial through them, or the result does not fit ``secret_len`` bytes.
    """
    ids = sorted(_check_ids(shares))
    if threshold < 1:
        raise SecAggError(f"threshold must be >= 1, got {threshold}")
    if len(ids) < threshold:
        raise SecAggError(f"need {threshold} shares to recover the secret, got {len(ids)}")
    if not 0 <= secret_len <= MAX_SECRET_BYTES:
        raise SecAggError(f"secret_len must lie in [0, {MAX_SECRET_BYTES}], got {secret_len}")
    points = [(x, _decode_share(x, shares[x])) for x in ids]
    base, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _lagrange_at(base, x) != y:
            raise SecAggError(
                f"inconsistent shares: share {x} does not lie on the polynomial through shares "
                f"{[p[0] for p in base]} (a share was tampered with or corrupted)"
            )
    secret = _lagrange_at(base, 0)
    if secret >= 256**secret_len:
        raise SecAggError(
            f"inconsistent shares: the recovered value does not fit {secret_len} bytes "
            "(a share was tampered with or corrupted)"
        )
    return secret.to_bytes(secret_len, "big")
