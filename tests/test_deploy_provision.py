"""fedaiot provision: keys Flower accepts, secrets 0600, nothing overwritten unless forced."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key

from fedaiot.deploy.provision import (
    ProvisionError,
    check_name,
    provision,
    registered_keys,
)
from fedaiot.registry.signing import load_private_key

SECRETS = [
    "ca.key",
    "superlink/server.key",
    "coordinator/coordinator.key",
    "institutions/alpha/node.key",
    "institutions/beta/node.key",
]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    provision(tmp_path / "pki", ["alpha", "beta"])
    return tmp_path / "pki"


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_secrets_are_0600_and_public_files_readable(pki: Path) -> None:
    for secret in SECRETS:
        assert _mode(pki / secret) == 0o600, secret
    for public in ["ca.crt", "superlink/server.crt", "institutions/alpha/node.pub"]:
        assert _mode(pki / public) == 0o644, public


def test_secrets_are_0600_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        provision(tmp_path / "pki", ["alpha"])
    finally:
        os.umask(old)
    assert _mode(tmp_path / "pki" / "institutions/alpha/node.key") == 0o600


def test_server_certificate_chains_to_the_ca_with_loopback_names(pki: Path) -> None:
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed root
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key((pki / "superlink/server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_node_keys_are_what_flower_reads(pki: Path) -> None:
    # flower-supernode --auth-supernode-private-key reads an OpenSSH private key ...
    private = serialization.load_ssh_private_key(
        (pki / "institutions/alpha/node.key").read_bytes(), None
    )
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    # ... and `flwr supernode register` an OpenSSH public key on a NIST curve.
    raw = try_load_public_key(pki / "institutions/alpha/node.pub")
    assert raw == private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (pki / "institutions/alpha/ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert set(registered_keys(pki)) == {"alpha", "beta"}
    load_private_key(pki / "coordinator/coordinator.key")  # the Ed25519 signing key


def test_extra_hosts_keep_the_loopback_names(tmp_path: Path) -> None:
    provision(tmp_path, ["alpha"], hosts=["fl.example.org", "10.0.0.7"])
    server = x509.load_pem_x509_certificate((tmp_path / "superlink/server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.0.0.7", "127.0.0.1"}


def test_existing_files_are_kept_and_new_institutions_added(pki: Path) -> None:
    before = {s: (pki / s).read_bytes() for s in SECRETS}
    done = provision(pki, ["alpha", "gamma"])
    assert {s: (pki / s).read_bytes() for s in SECRETS} == before
    assert pki / "institutions/alpha/node.key" in done.kept
    assert pki / "institutions/gamma/node.key" in done.created
    assert pki / "ca.key" not in done.created
    gamma_ca = (pki / "institutions/gamma/ca.crt").read_bytes()
    assert gamma_ca == (pki / "ca.crt").read_bytes()


def test_force_replaces_everything_named(pki: Path) -> None:
    old_key = (pki / "institutions/alpha/node.key").read_bytes()
    old_ca = (pki / "ca.crt").read_bytes()
    provision(pki, ["alpha"], force=True)
    assert (pki / "institutions/alpha/node.key").read_bytes() != old_key
    assert (pki / "ca.crt").read_bytes() != old_ca
    assert _mode(pki / "institutions/alpha/node.key") == 0o600
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((pki / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)


def test_half_a_ca_is_refused(pki: Path) -> None:
    (pki / "ca.crt").unlink()
    with pytest.raises(ProvisionError, match="half a CA"):
        provision(pki, ["alpha"])


@pytest.mark.parametrize("name", ["", "Alpha", "a b", "../x", "x" * 64])
def test_bad_institution_names_are_refused(name: str) -> None:
    with pytest.raises(ProvisionError, match="institution name"):
        check_name(name)


def test_cli_exits_2_on_bad_input_and_lists_what_it_kept(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "fedaiot", "provision", "--out", str(tmp_path / "pki")]
    bad = subprocess.run([*cli, "--institution", "Bad Name"], capture_output=True, text=True)
    assert bad.returncode == 2 and "institution name" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    first = subprocess.run([*cli, "--institution", "alpha"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*cli, "--institution", "alpha"], capture_output=True, text=True)
    assert again.returncode == 0 and "kept" in again.stdout and "created" not in again.stdout
