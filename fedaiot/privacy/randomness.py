"""Randomness that protects records: a ChaCha20 keystream keyed from the operating system.

The guarantee. DP-SGD's guarantee assumes that whoever sees a node's update cannot predict the
noise added to it, nor which records Poisson sampling chose. :class:`SecureRandom` draws both
from a ChaCha20 keystream (``cryptography``'s primitive) under a 256-bit key read from
``os.urandom`` when the object is made: nothing in a run's configuration, a node's name, the
round number or any seed influences it, and a fresh object is made for every round, so
knowing one round's key (a leaked core dump, say) says nothing about another's. This is what
Opacus' ``secure_mode`` got from ``torchcsprng``, which has no build for torch 2.13.

Gaussians come from the Box-Muller transform of 53-bit uniforms, in float64, and are rounded
to the parameters' float32 only when added. Floating-point attacks on the low-order bits of a
Gaussian sample (Jin et al. 2022) are not addressed; the sum of clipped gradients they would
target is itself a sum of float32 values, and no such attack on DP-SGD updates is known.

What the caller must do: make one object per round (never share it between nodes), never log
or send its output, and use :meth:`SecureRandom.seeded` only for research runs whose results
are marked not private (``seeded-noise``): anyone who knows the seed can recompute the noise.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
_NONCE = bytes(16)  # one key per object, so one fixed nonce never repeats under a key
_CHUNK = 1 << 20  # keystream bytes per call to the cipher
_SEEDED_LABEL = b"fedaiot-seeded-noise/1"


class SecureRandom:
    """Uniforms, Bernoulli draws and Gaussians from ChaCha20 under a key only this object holds."""

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"SecureRandom needs a {KEY_BYTES}-byte key, got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        self.reproducible = False  # True when keyed from a seed: not private

    @classmethod
    def seeded(cls, *parts: object) -> SecureRandom:
        """A reproducible stream for research runs: keyed by a hash of ``parts``. Not private."""
        material = _SEEDED_LABEL + b"\0".join(str(part).encode() for part in parts)
        generator = cls(hashlib.sha256(material).digest())
        generator.reproducible = True
        return generator

    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        """``count`` uniform 64-bit words of keystream."""
        out = bytearray(8 * count)
        view = memoryview(out)
        for start in range(0, len(out), _CHUNK):
            block = view[start : start + _CHUNK]
            self._stream.update_into(bytes(len(block)), block)  # ChaCha20 of zeros: keystream
        return np.frombuffer(out, dtype=np.uint64)

    def uniform(self, count: int) -> npt.NDArray[np.float64]:
        """``count`` floats uniform in the open interval (0, 1), 53 bits each."""
        return ((self._words(count) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def bernoulli(self, count: int, probability: float) -> npt.NDArray[np.bool_]:
        """``count`` independent draws that are True with ``probability``."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        return self.uniform(count) < probability

    def normal(self, count: int, std: float = 1.0) -> npt.NDArray[np.float64]:
        """``count`` independent Gaussians of mean 0 and standard deviation ``std``."""
        if std < 0 or not np.isfinite(std):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        pairs = (count + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = 2.0 * np.pi * u[pairs:]
        both = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return both[:count] * std
