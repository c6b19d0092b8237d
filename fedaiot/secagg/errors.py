"""Errors of the secure-aggregation protocol.

Every failure raises a :class:`SecAggError` (or a subclass), never a bare ``ValueError`` from a
primitive: the caller can abort the round on one ``except`` clause. A round that raised must be
abandoned, never retried with the same :class:`~fedaiot.secagg.messages.RoundSetup` (a retry
would reuse per-round secrets and masks); start a fresh round with a fresh setup instead.
"""

from __future__ import annotations

from fedaiot.errors import SecurityError


class SecAggError(SecurityError):
    """The round cannot go on: a message is malformed, out of place, or fails a check."""


class ProtocolViolation(SecAggError):
    """A party sent something the protocol forbids: a replay, a duplicate, an unknown node,
    a message out of stage order, or a request that would reveal an individual input."""


class AuthenticationError(SecAggError):
    """An authenticated ciphertext was tampered with, replayed, or sent to the wrong node."""


class TooFewSurvivorsError(SecAggError):
    """Too few nodes are left (overall, or around one node) to finish the round safely."""


class DisconnectedSurvivorsError(TooFewSurvivorsError):
    """The surviving nodes fall into groups joined by no mask, so unmasking would reveal the
    sum of each group rather than only the total."""
