"""``fedaiot node init`` and ``fedaiot node pin``: an institution's keys, made on its own machine.

The institution's kit folder (``secret`` files are written 0600 from their first byte)::

    node.key      secret  ECDSA P-384, OpenSSH: the SuperNode's identity at the SuperLink
    node.pub              registered by the coordinator (``flwr supernode register``)
    identity.key  secret  Ed25519, PEM: signs the node's secure-aggregation keys and the
                          survivor sets it is shown
    identity.pub          the institution's entry in the federation roster
    review.key    secret  Ed25519, OpenSSH: signs the app bundles the institution approves
                          (``fedaiot node approve``); it may live on a reviewer's machine instead
    review.pub            the key the node's SuperNode trusts (``trusted-entities.yaml``)
    trusted-entities.yaml the keys whose signature on an app bundle this node accepts
    request.json          the public parts only, for the coordinator (``provision --approve``)
    ca.crt                the federation's TLS CA, from the coordinator (``node pin``)
    roster.json           the federation roster, pinned after comparing its fingerprint

No private key ever leaves this folder: the request holds public keys only, and the coordinator
needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.deploy.provision import CA_CERT, NODE_KEY, NODE_PUB, check_name, write_file
from fedaiot.deploy.superlink import KitError
from fedaiot.secagg import Roster, SecAggError
from fedaiot.secagg.authentication import load_public, openssh_line

IDENTITY_KEY, IDENTITY_PUB = "identity.key", "identity.pub"
REVIEW_KEY, REVIEW_PUB = "review.key", "review.pub"
TRUSTED, REQUEST, ROSTER = "trusted-entities.yaml", "request.json", "roster.json"
REQUEST_FORMAT = "fedaiot-node-request/1"
SECRETS = (NODE_KEY, IDENTITY_KEY, REVIEW_KEY)


def review_key_id(institution: str) -> str:
    """The name an institution's review key goes by in trust files and bundle signatures."""
    return f"{institution}-review"


def node_keypair(name: str) -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as Flower's node authentication reads it (OpenSSH encodings)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedaiot-{name}\n".encode()


def _ed25519(form: serialization.PrivateFormat) -> tuple[bytes, bytes]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    return private, (openssh_line(key.public_key()) + "\n").encode()


@dataclass(frozen=True)
class NodeRequest:
    """What an institution sends the coordinator: its name and three public keys."""

    institution: str
    node: str  # OpenSSH ECDSA P-384 line: registered with the SuperLink
    identity: str  # ssh-ed25519: the roster entry
    review: str  # ssh-ed25519: checks the institution's approvals of app bundles

    @classmethod
    def load(cls, path: Path) -> NodeRequest:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise KitError(f"request {path} is unreadable: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != REQUEST_FORMAT:
            raise KitError(f"{path} is not a node request ({REQUEST_FORMAT})")
        if set(raw) != {"format", "institution", "node", "identity", "review"}:
            raise KitError(f"request {path} holds unexpected fields: {sorted(raw)}")
        request = cls(
            str(raw["institution"]), str(raw["node"]), str(raw["identity"]), str(raw["review"])
        )
        request.check(path)
        return request

    def check(self, where: Path) -> None:
        check_name(self.institution)
        try:
            load_public(self.identity, f"{where}: identity")
            load_public(self.review, f"{where}: review")
            node = serialization.load_ssh_public_key(self.node.encode())
        except (SecAggError, ValueError) as exc:
            raise KitError(f"request {where}: {exc}") from None
        if not isinstance(node, ec.EllipticCurvePublicKey):
            raise KitError(f"request {where}: the node key must be ECDSA (Flower reads no other)")

    def to_json(self) -> str:
        fields = {"format": REQUEST_FORMAT, **self.__dict__}
        return json.dumps(fields, indent=2) + "\n"

    @property
    def fingerprint(self) -> str:
        """What the coordinator reads back to the institution before approving it."""
        return "SHA256:" + hashlib.sha256(self.to_json().encode()).hexdigest()[:32]


def init_node(folder: Path, name: str, *, force: bool = False) -> NodeRequest:
    """Make the institution's keys in ``folder`` and write its request; refuse to replace an
    existing key unless ``force`` (a new key must be approved again by the coordinator)."""
    check_name(name)
    folder = Path(folder)
    pairs = {
        (NODE_KEY, NODE_PUB): node_keypair(name),
        (IDENTITY_KEY, IDENTITY_PUB): _ed25519(serialization.PrivateFormat.PKCS8),
        (REVIEW_KEY, REVIEW_PUB): _ed25519(serialization.PrivateFormat.OpenSSH),
    }
    for (secret, public), (private_bytes, public_bytes) in pairs.items():
        write_file(folder / secret, private_bytes, secret=True, force=force)
        write_file(folder / public, public_bytes, secret=False, force=force)
    public_lines = {pub: data.decode().strip() for (_, pub), (_, data) in pairs.items()}
    request = NodeRequest(
        name,
        public_lines[NODE_PUB],
        public_lines[IDENTITY_PUB],
        public_lines[REVIEW_PUB],
    )
    write_file(folder / REQUEST, request.to_json().encode(), secret=False, force=force)
    write_trusted(folder, {review_key_id(name): public_lines[REVIEW_PUB]}, force=force)
    return request


def read_trusted(folder: Path) -> dict[str, str]:
    path = Path(folder) / TRUSTED
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KitError(f"{path} is unreadable: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise KitError(f"{path} names no trusted key: the node would run no app")
    for key_id, line in raw.items():
        try:
            load_public(str(line), f"{path}: {key_id}")
        except SecAggError as exc:
            raise KitError(str(exc)) from None
    return {str(k): str(v) for k, v in raw.items()}


def write_trusted(folder: Path, entries: dict[str, str], *, force: bool = True) -> Path:
    """``trusted-entities.yaml`` as ``flower-supernode --trusted-entities`` reads it."""
    path = Path(folder) / TRUSTED
    text = yaml.safe_dump(dict(sorted(entries.items())), default_flow_style=False)
    write_file(path, text.encode(), secret=False, force=force)
    return path


def trust_publisher(folder: Path, key_id: str, public_key: Path) -> dict[str, str]:
    """Add a publisher's review key to the keys whose signed bundles this node runs."""
    check_name(key_id)
    try:
        line = openssh_line(load_public(Path(public_key).read_text(), str(public_key)))
    except OSError as exc:
        raise KitError(f"{public_key} is unreadable: {exc.strerror}") from None
    except SecAggError as exc:
        raise KitError(str(exc)) from None
    entries = {**read_trusted(folder), key_id: line}
    write_trusted(folder, entries)
    return entries


def pin(folder: Path, roster: Path, ca: Path, *, expect: str = "") -> Roster:
    """Copy the federation roster and CA into the kit, once this institution's own identity is
    in the roster (and, given ``expect``, the fingerprint is the one compared out of band)."""
    folder = Path(folder)
    try:
        pinned = Roster.load(roster)
        x509.load_pem_x509_certificate(Path(ca).read_bytes())
    except SecAggError as exc:
        raise KitError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise KitError(f"{ca} is not a PEM certificate: {exc}") from None
    if expect and expect != pinned.fingerprint:
        raise KitError(
            f"roster {roster} has fingerprint {pinned.fingerprint}, not {expect}: do not use it"
        )
    mine = openssh_line(load_public((folder / IDENTITY_PUB).read_text(), str(folder)))
    if mine not in pinned.lines().values():
        raise KitError(
            f"roster {roster} ({pinned.fingerprint}) does not hold this kit's identity key: "
            "it is not this federation's roster, or the coordinator has not approved this kit"
        )
    write_file(folder / ROSTER, pinned.to_json().encode(), secret=False, force=True)
    if Path(ca).resolve() != (folder / CA_CERT).resolve():
        shutil.copyfile(ca, folder / CA_CERT)
    return pinned
