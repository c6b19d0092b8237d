"""Authenticated key exchange and the survivor-set consistency check, for a malicious coordinator.

The coordinator relays every message of a round. Unauthenticated, a coordinator that replaces a
node's advertised public keys with its own sits between that node and each neighbour: it opens
the shares sealed to the node and agrees every pairwise mask with the neighbours. And one that
tells some nodes that node j survived and others that it dropped collects shares of both of j's
secrets and removes j's masks alone. Two additions close both (Bonawitz et al. CCS 2017, the
malicious-server variant; Bell et al. CCS 2020, section 4):

* **Signed advertisements.** Each institution holds an Ed25519 *identity key*. The round setup
  names, for every protocol id, the institution it stands for (``RoundSetup.identities``), and a
  node signs its advertisement over :func:`advert_message`: a label, the round context (which
  hashes every setup field, the identities included), the round id, its node id, its name and
  both public keys. A node verifies each neighbour's advertisement against the key its pinned
  :class:`Roster` holds for the name the setup gives that neighbour, and refuses the whole round
  on any mismatch: only the coordinator could have changed a relayed key.
* **Signed survivor sets.** Before revealing any share, a node signs the survivor and dropped
  sets it was shown (:func:`confirmation_message`); the coordinator relays the signatures, and a
  node unmasks only when more than ``(n + c) / 2`` of the round's ``n`` nodes signed exactly the
  sets it was shown (``c``: the colluding nodes the run allows for). Two different sets cannot
  both gather that many signatures, since honest nodes sign one each and only the ``c``
  colluders could sign both: ``|A| + |B| <= n + c``.

The roster is the federation's list of institutions and their identity keys. Every institution
pins the same roster out of band by comparing :attr:`Roster.fingerprint`, like an SSH host key;
the coordinator distributes it but cannot change it unnoticed. Nothing here is a new primitive:
Ed25519 signatures from ``cryptography`` over a length-prefixed encoding.

What the caller must do: load the node's own identity (:class:`NodeIdentity`) from files only
the institution controls (never from a message), and pass it to every stage of the round.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedaiot.secagg.errors import AuthenticationError, ProtocolViolation, SecAggError

if TYPE_CHECKING:
    from fedaiot.secagg.setup import RoundSetup

SIGNATURE_BYTES = 64
ROSTER_FORMAT = "fedaiot-roster/1"
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ADVERT_LABEL = b"fedaiot-secagg-advert/1"
_CONFIRM_LABEL = b"fedaiot-secagg-survivors/1"


def _encode(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different field lists share an encoding."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _ids(ids: Collection[int]) -> bytes:
    return b"".join(_u64(i) for i in sorted(ids))


def openssh_line(key: Ed25519PublicKey) -> str:
    """``ssh-ed25519 AAAA...``: the form keys take in rosters, requests and trust files."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def load_public(line: str, what: str) -> Ed25519PublicKey:
    """An OpenSSH ``ssh-ed25519`` public key line (a trailing comment is allowed)."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, UnicodeError) as exc:
        raise SecAggError(f"{what}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SecAggError(f"{what}: an identity key must be ssh-ed25519")
    return key


@dataclass(frozen=True)
class Roster:
    """The federation's institutions and their identity public keys, as every node pins it."""

    keys: Mapping[str, Ed25519PublicKey]

    def __post_init__(self) -> None:
        bad = sorted(name for name in self.keys if not NAME.fullmatch(name))
        if bad:
            raise SecAggError(f"roster: invalid institution names {bad}")
        if not self.keys:
            raise SecAggError("roster: it names no institution")

    @classmethod
    def from_lines(cls, identities: Mapping[str, str]) -> Roster:
        return cls(
            {name: load_public(line, f"roster entry {name!r}") for name, line in identities.items()}
        )

    @classmethod
    def load(cls, path: Path) -> Roster:
        """A roster file (JSON: ``format`` and ``identities``, name -> OpenSSH key line)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SecAggError(f"roster {path} is unreadable: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT:
            raise SecAggError(f"roster {path}: not a {ROSTER_FORMAT} file")
        identities = raw.get("identities")
        if not isinstance(identities, dict) or not all(
            isinstance(v, str) for v in identities.values()
        ):
            raise SecAggError(f"roster {path}: 'identities' must map names to key lines")
        return cls.from_lines(identities)

    def lines(self) -> dict[str, str]:
        return {name: openssh_line(self.keys[name]) for name in sorted(self.keys)}

    def to_json(self) -> str:
        return json.dumps({"format": ROSTER_FORMAT, "identities": self.lines()}, indent=2) + "\n"

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64>`` over one ``name key`` line per institution, sorted: the same
        roster gives the same fingerprint whatever its file's layout or key comments."""
        text = ROSTER_FORMAT + "\n" + "".join(f"{n} {k}\n" for n, k in self.lines().items())
        digest = hashlib.sha256(text.encode()).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def key(self, name: str, who: str) -> Ed25519PublicKey:
        try:
            return self.keys[name]
        except KeyError:
            raise AuthenticationError(
                f"{who}: {name!r} is not in the pinned roster {self.fingerprint}"
            ) from None


@dataclass(frozen=True)
class NodeIdentity:
    """A node's own name, identity private key and pinned roster (the key must be its entry)."""

    name: str
    key: Ed25519PrivateKey
    roster: Roster

    def __post_init__(self) -> None:
        pinned = self.roster.key(self.name, f"identity {self.name!r}")
        if openssh_line(pinned) != openssh_line(self.key.public_key()):
            raise SecAggError(
                f"identity {self.name!r}: this node's identity key is not the one the pinned "
                f"roster {self.roster.fingerprint} holds for it"
            )

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def advert_message(setup: RoundSetup, node_id: int, enc_public: bytes, mask_public: bytes) -> bytes:
    """What a node signs for its key advertisement."""
    name = setup.identity_of(node_id)
    return _encode(
        _ADVERT_LABEL,
        setup.context,
        _u64(setup.round_id),
        _u64(node_id),
        name.encode(),
        enc_public,
        mask_public,
    )


def confirmation_message(
    setup: RoundSetup, node_id: int, survivors: Collection[int], dropped: Collection[int]
) -> bytes:
    """What a node signs for the survivor and dropped sets it was shown."""
    return _encode(
        _CONFIRM_LABEL,
        setup.context,
        _u64(setup.round_id),
        _u64(node_id),
        _ids(survivors),
        _ids(dropped),
    )


def _verifies(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def confirmations_needed(nodes: int, colluders: int) -> int:
    """More than ``(n + c) / 2``: two different survivor sets can never both reach it."""
    return (nodes + max(colluders, 0)) // 2 + 1


class Authenticator:
    """A node's checks on what the coordinator relays, for one round."""

    def __init__(self, identity: NodeIdentity, setup: RoundSetup, node_id: int) -> None:
        self.identity, self.setup, self.node_id = identity, setup, node_id
        self.who = f"node {node_id} ({identity.name})"
        if not setup.identities:
            raise ProtocolViolation(
                f"{self.who} refuses the round: it names no institution for its nodes, so "
                "their key advertisements cannot be checked against the pinned roster"
            )
        for node, name in zip(setup.node_ids, setup.identities, strict=True):
            identity.roster.key(name, f"{self.who} refuses the round: node {node}")
        if setup.identity_of(node_id) != identity.name:
            raise ProtocolViolation(
                f"{self.who} refuses the round: the setup names its node id "
                f"{setup.identity_of(node_id)!r}, not this institution"
            )

    def name(self, node: int) -> str:
        return f"node {node} ({self.setup.identity_of(node)})"

    def sign_advert(self, enc_public: bytes, mask_public: bytes) -> bytes:
        return self.identity.sign(advert_message(self.setup, self.node_id, enc_public, mask_public))

    def check_adverts(
        self, keys: Mapping[int, tuple[bytes, bytes]], signatures: Mapping[int, bytes]
    ) -> None:
        """Every neighbour's keys must carry its signature under the roster's key for it."""
        for node, (enc, mask) in sorted(keys.items()):
            name = self.setup.identity_of(node)
            key = self.identity.roster.key(name, f"{self.who} refuses the round")
            message = advert_message(self.setup, node, enc, mask)
            if not _verifies(key, signatures.get(node, b""), message):
                raise AuthenticationError(
                    f"{self.who} refuses the round: the public keys relayed for "
                    f"{self.name(node)} are not signed by {name}'s identity key in the pinned "
                    f"roster {self.identity.roster.fingerprint} (keys substituted in transit?)"
                )

    def confirm(self, survivors: Collection[int], dropped: Collection[int]) -> bytes:
        return self.identity.sign(
            confirmation_message(self.setup, self.node_id, survivors, dropped)
        )

    def check_confirmations(
        self,
        survivors: Collection[int],
        dropped: Collection[int],
        confirmations: Mapping[int, bytes],
        needed: int,
    ) -> None:
        """Enough nodes must have signed exactly the sets this node was shown, and no
        relayed signature may fail: a failing one means another node saw other sets."""
        message_of = {
            node: confirmation_message(self.setup, node, survivors, dropped)
            for node in confirmations
        }
        for node, signature in sorted(confirmations.items()):
            if node not in survivors:
                raise ProtocolViolation(
                    f"{self.who} refuses to unmask: a confirmation from {node}, which is not "
                    "among the survivors it was shown"
                )
            key = self.identity.roster.key(self.setup.identity_of(node), self.who)
            if not _verifies(key, signature, message_of[node]):
                raise AuthenticationError(
                    f"{self.who} refuses to unmask: {self.name(node)} did not sign the survivor "
                    "set this node was shown (the coordinator showed nodes different survivor "
                    "sets, or altered a signature)"
                )
        if len(confirmations) < needed:
            raise AuthenticationError(
                f"{self.who} refuses to unmask: {len(confirmations)} of "
                f"{len(self.setup.node_ids)} nodes confirmed the survivor set it was shown, "
                f"{needed} are needed (the coordinator may be showing nodes different survivor "
                "sets)"
            )
