"""Fixed-point quantisation of float vectors into the ring Z_{2^m}.

Secure aggregation adds masked integers modulo ``2^m`` (``m = modulus_bits`` <= 64). A float
``v`` is encoded as the two's complement of ``round(v * 2^frac_bits)`` and the sum of ``n``
encodings is decoded by reading it as a signed ``m``-bit integer and dividing by ``2^frac_bits``.
numpy's ``uint64`` arithmetic wraps modulo ``2^64``, which is also correct modulo ``2^m`` for
every ``m <= 64`` once the low ``m`` bits are kept.

The guarantee. Each encoded value is off by at most ``2^-(frac_bits+1)`` (round to nearest), so
a decoded sum of ``n`` encodings is off from the exact sum by at most ``n * 2^-(frac_bits+1)``
per coordinate, plus the float64 rounding of the result (relative ``2^-53``). This holds only
if the true sum never wraps around the ring, which :meth:`Quantizer.check_capacity` checks.

What the caller must do: bound every value a node encodes by ``max_abs`` (clip before, e.g. the
DP clipping norm times the weight) and call :meth:`Quantizer.check_capacity` with the largest
number of nodes that may be summed; :meth:`Quantizer.encode` refuses values over ``max_abs``
rather than clipping them silently.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedaiot.secagg.errors import SecAggError

U64 = npt.NDArray[np.uint64]
F64 = npt.NDArray[np.float64]


def ring_mask(modulus_bits: int) -> np.uint64:
    """The mask that keeps the low ``modulus_bits`` bits of a ``uint64``."""
    return np.uint64((1 << modulus_bits) - 1)


class Quantizer:
    """Encode floats into ``Z_{2^modulus_bits}`` with ``frac_bits`` fractional bits.

    Args:
        frac_bits: fractional bits; the step is ``2^-frac_bits``.
        modulus_bits: the ring is ``Z_{2^modulus_bits}``, ``2 <= modulus_bits <= 64``.
        max_abs: the per-value bound that :meth:`encode` enforces; ``None`` only requires that
            one value fits in the ring.
    """

    def __init__(
        self, frac_bits: int = 24, modulus_bits: int = 64, max_abs: float | None = None
    ) -> None:
        if not 2 <= modulus_bits <= 64:
            raise SecAggError(f"modulus_bits must lie in [2, 64], got {modulus_bits}")
        if not 0 <= frac_bits <= modulus_bits - 2:
            raise SecAggError(
                f"frac_bits must lie in [0, modulus_bits - 2 = {modulus_bits - 2}], got {frac_bits}"
            )
        if max_abs is not None and not (math.isfinite(max_abs) and max_abs > 0):
            raise SecAggError(f"max_abs must be finite and > 0, got {max_abs}")
        self.frac_bits = frac_bits
        self.modulus_bits = modulus_bits
        self.max_abs = max_abs
        self.mask = ring_mask(modulus_bits)

    @property
    def step(self) -> float:
        """The quantisation step ``2^-frac_bits``; each value is off by at most half of it."""
        return 2.0**-self.frac_bits

    def error_bound(self, n: int) -> float:
        """Largest error per coordinate of a decoded sum of ``n`` encodings."""
        return n * 2.0 ** -(self.frac_bits + 1)

    def check_capacity(self, max_abs: float, n: int) -> None:
        """Raise :class:`SecAggError` if ``n`` values of magnitude ``max_abs`` could wrap.

        Exact integer check: ``n * round(max_abs * 2^frac) <= 2^(modulus_bits-1) - 1``, i.e.
        about ``n * max_abs * 2^frac < 2^(modulus_bits-1)``.
        """
        if n < 1:
            raise SecAggError(f"capacity needs n >= 1, got {n}")
        if not (math.isfinite(max_abs) and max_abs > 0):
            raise SecAggError(f"max_abs must be finite and > 0, got {max_abs}")
        q_max = math.floor(math.ldexp(max_abs, self.frac_bits) + 0.5)
        if n * q_max > 2 ** (self.modulus_bits - 1) - 1:
            room = (2 ** (self.modulus_bits - 1) - 1) / 2.0**self.frac_bits / n
            raise SecAggError(
                f"a sum of {n} values of magnitude {max_abs} could wrap around Z_2^"
                f"{self.modulus_bits} with {self.frac_bits} fractional bits; lower max_abs "
                f"to <= {room:.6g}, or frac_bits, or raise modulus_bits"
            )

    def encode(self, vec: npt.ArrayLike) -> U64:
        """Encode a 1-D float vector; raise :class:`SecAggError` on NaN/inf or over-range."""
        x = np.asarray(vec, dtype=np.float64)
        if x.ndim != 1:
            raise SecAggError(f"encode expects a 1-D vector, got shape {x.shape}")
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            i = int(bad[0])
            raise SecAggError(f"value at index {i} is {float(x[i])}; only finite values are summed")
        scaled = np.rint(np.ldexp(x, self.frac_bits))
        # One encoded value must read back with its sign: |q| < 2^(m-1) (exact in float64).
        over = np.abs(scaled) >= 2.0 ** (self.modulus_bits - 1)
        if self.max_abs is not None:
            over |= np.abs(x) > self.max_abs
        bad = np.flatnonzero(over)
        if bad.size:
            i = int(bad[0])
            bound = 2.0 ** (self.modulus_bits - 1 - self.frac_bits)
            if self.max_abs is not None:
                bound = min(bound, self.max_abs)
            raise SecAggError(
                f"value at index {i} is {float(x[i])!r}, over the bound {bound!r} "
                f"({bad.size} value(s) over); clip the vector before encoding"
            )
        q = scaled.astype(np.int64).view(np.uint64)
        if self.modulus_bits < 64:
            np.bitwise_and(q, self.mask, out=q)
        return q

    def decode(self, sum_vec: npt.NDArray[np.uint64]) -> F64:
        """Read a (sum of) encodings as signed ``modulus_bits``-bit integers, scaled to floats."""
        s = np.asarray(sum_vec)
        if s.dtype != np.uint64:
            raise SecAggError(f"decode expects uint64, got {s.dtype}")
        if self.modulus_bits == 64:
            signed = s.view(np.int64)
        else:
            low = np.bitwise_and(s, self.mask)
            signed = low.astype(np.int64)
            signed[low >= np.uint64(1 << (self.modulus_bits - 1))] -= np.int64(
                1 << self.modulus_bits
            )
        return np.ldexp(signed.astype(np.float64), -self.frac_bits)
