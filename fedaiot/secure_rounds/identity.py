"""A deployed node's identity in secure aggregation: its identity key and its pinned roster.

Both are files of the institution's kit (``fedaiot node init``, ``fedaiot node roster``), named
in the SuperNode's node config, and read afresh for every stage: never from a message, and never
copied into ``Context.state`` with the round's secrets. The node's name is the roster entry that
holds its key, so the kit cannot claim to be another institution by renaming itself.

A deployed node (its node config names a data file) takes part in secure rounds only with an
identity: without one it could not tell a coordinator's key substitution from a neighbour's
key. A simulated node has none, and its rounds stay unauthenticated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.errors import BadInputError
from fedaiot.secagg import NodeIdentity, Roster, SecAggError
from fedaiot.secagg.authentication import openssh_line

IDENTITY_KEY, ROSTER = "identity-key", "roster"  # node config keys: paths in the kit
_DEPLOYED = "data-path"


class IdentityError(BadInputError):
    """The node's identity key or pinned roster is missing, unreadable or does not match."""

    reason = "config-error"


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise IdentityError(f"identity key {path} is unreadable: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is not an Ed25519 key")
    return key


def identity_from(key_path: Path, roster_path: Path) -> NodeIdentity:
    """The identity whose key is ``key_path``, named by the roster entry holding that key."""
    key = load_identity_key(key_path)
    try:
        roster = Roster.load(roster_path)
    except SecAggError as exc:
        raise IdentityError(str(exc)) from None
    mine = openssh_line(key.public_key())
    names = [name for name, line in roster.lines().items() if line == mine]
    if not names:
        raise IdentityError(
            f"the pinned roster {roster_path} ({roster.fingerprint}) does not hold this node's "
            f"identity key {key_path}: it is another federation's, or the key was replaced"
        )
    return NodeIdentity(names[0], key, roster)


def node_identity(node_config: Mapping[str, Any]) -> NodeIdentity | None:
    """The node's identity from its node config; None for a simulated node."""
    if IDENTITY_KEY not in node_config or ROSTER not in node_config:
        if _DEPLOYED in node_config:
            raise IdentityError(
                "a deployed node takes part in secure aggregation only with its identity key "
                "and pinned roster (`fedaiot node init`, `fedaiot node roster`); its node "
                f"config names no {IDENTITY_KEY!r} and {ROSTER!r}"
            )
        return None
    return identity_from(Path(str(node_config[IDENTITY_KEY])), Path(str(node_config[ROSTER])))


def colluders(run_config: Mapping[str, Any], nodes: int) -> int:
    """The colluding nodes the run allows for in a round of ``nodes``: the same number every
    node of the round computes, since they read one run config."""
    fraction = float(run_config.get("secagg-collusion", 0.0))
    return math.floor(fraction * nodes) if math.isfinite(fraction) and fraction > 0 else 0
