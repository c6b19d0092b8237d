"""``fedaiot provision``: the coordinator's keys and certificates, and the institutions it
admits, made with `cryptography` only.

Layout of the provisioning folder (``secret`` files are written 0600 from the start)::

    ca.crt                              certificate authority: give it to every institution
    ca.key                      secret  keep offline on the coordinator's side
    superlink/server.crt                the SuperLink's TLS certificate (signed by ca.key)
    superlink/server.key        secret  stays on the SuperLink's machine
    coordinator/coordinator.key secret  Ed25519: signs registered models and service tokens
    coordinator/coordinator.pub         verifies them
    institutions/<name>/node.pub        the institution's node key, registered with the SuperLink
    institutions/<name>/identity.pub    its identity key (secure aggregation), in the roster
    institutions/<name>/review.pub      its review key: checks its approvals of app bundles
    institutions/<name>/ca.crt          a copy of ca.crt, to send back with the roster
    roster.json                         the federation roster: every institution's identity key

Institutions make their own keys (``fedaiot node init``) and send a request holding public keys
only; ``--approve REQUEST`` registers it here. No private key of an institution is ever made,
received or written by the coordinator.

Nothing existing is overwritten unless ``force``: an existing file is kept and reported as
kept, so re-running with a new request adds only that institution.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedaiot.errors import BadInputError
from fedaiot.registry import signing

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink/server.crt", "superlink/server.key"
NODE_KEY, NODE_PUB = "node.key", "node.pub"
INSTITUTIONS = "institutions"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_CA_DAYS, _SERVER_DAYS = 3650, 825  # 825 days: the longest server lifetime browsers accept


class ProvisionError(BadInputError):
    """Bad provisioning input, or an existing file that cannot be reused."""


@dataclass
class Provisioned:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ProvisionError(
            f"institution name {name!r}: use 1-63 lowercase letters, digits, '-' or '_'"
        )
    return name


def institution_dir(root: Path, name: str) -> Path:
    return Path(root) / INSTITUTIONS / check_name(name)


def write_file(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    """Create ``path`` with its final mode from the first byte; refuse to replace unless forced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    if path.exists():
        if not force:
            raise ProvisionError(f"{path} already exists: refusing to overwrite it (use --force)")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # a restrictive umask may have narrowed a public file


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedaiot federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedaiot federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=_SERVER_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _load_ca(root: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot reuse the CA in {root}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{root / CA_KEY} is not an EC key")
    return key, cert


def _write_pair(
    key_path: Path, key: ec.EllipticCurvePrivateKey, cert_path: Path, cert: x509.Certificate
) -> None:
    write_file(key_path, _key_pem(key), secret=True, force=True)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), secret=False, force=True)


def provision(
    root: Path,
    requests: list[Path] | None = None,
    *,
    hosts: list[str] | None = None,
    force: bool = False,
) -> Provisioned:
    """Create what is missing under ``root`` (everything named, with ``force``) and register
    each institution's request (``fedaiot node init`` made it, with public keys only)."""
    from fedaiot.deploy.registration import register_requests

    root = Path(root)
    # The loopback names always: the coordinator's own flwr commands reach the SuperLink there.
    hosts = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    done = Provisioned()

    def fresh(path: Path) -> bool:
        if path.exists() and not force:
            done.kept.append(path)
            return False
        done.created.append(path)
        return True

    ca_parts = [(root / CA_KEY).exists(), (root / CA_CERT).exists()]
    if not force and any(ca_parts) and not all(ca_parts):
        raise ProvisionError(f"{root} holds half a CA (ca.key or ca.crt): use --force")
    new_ca = fresh(root / CA_KEY) & fresh(root / CA_CERT)
    if new_ca:
        ca_key, ca_cert = make_ca()
        _write_pair(root / CA_KEY, ca_key, root / CA_CERT, ca_cert)
    else:
        ca_key, ca_cert = _load_ca(root)
    server = [root / SERVER_KEY, root / SERVER_CERT]
    if not force and any(p.exists() for p in server):
        if new_ca or not all(p.exists() for p in server):
            raise ProvisionError(
                f"{root / 'superlink'} holds a server key or certificate that does not match "
                "the CA: use --force to replace them"
            )
        done.kept.extend(server)
    else:
        key, cert = make_server_cert(ca_key, ca_cert, hosts)
        _write_pair(server[0], key, server[1], cert)
        done.created.extend(server)
    signing_dir = root / "coordinator"
    if fresh(signing_dir / signing.PRIVATE_KEY_FILE):
        signing.generate_keypair(signing_dir, force=True)
        done.created.append(signing_dir / signing.PUBLIC_KEY_FILE)
    ca_copy = ca_cert.public_bytes(serialization.Encoding.PEM)
    register_requests(root, requests or [], ca_copy, done, force=force)
    return done


def registered_keys(root: Path) -> dict[str, Path]:
    """Every institution's public key under ``root``, by institution name."""
    folder = Path(root) / INSTITUTIONS
    if not folder.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(folder.glob(f"*/{NODE_PUB}"))}
