"""Keys made where they are used: an institution's kit (``node init``, ``node pin``) holds its
private keys, 0600; ``fedaiot provision`` writes the coordinator's keys and certificates and
only public keys of institutions; nothing is overwritten unless forced."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key

from fedaiot.deploy.institution_keys import init_node, pin
from fedaiot.deploy.provision import ProvisionError, check_name, provision, registered_keys
from fedaiot.deploy.superlink import KitError
from fedaiot.registry.signing import load_private_key
from fedaiot.secagg import Roster
from fedaiot.secure_rounds.identity import identity_from
from tests.deploy_support import federation

COORDINATOR_SECRETS = ["ca.key", "superlink/server.key", "coordinator/coordinator.key"]
KIT_SECRETS = ["node.key", "identity.key", "review.key"]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_no_file_provision_writes_holds_an_institutions_private_key(tmp_path: Path) -> None:
    fed = federation(tmp_path, ["alpha", "beta"])
    written = _files(fed.pki)
    secrets = {
        f"{name}/{secret}": (kit / secret).read_bytes()
        for name, kit in fed.kits.items()
        for secret in KIT_SECRETS
    }
    # the raw private scalars too, not only their file encodings
    for name, kit in fed.kits.items():
        node = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), None)
        assert isinstance(node, ec.EllipticCurvePrivateKey)
        secrets[f"{name}/node scalar"] = node.private_numbers().private_value.to_bytes(48, "big")
        identity = identity_from(kit / "identity.key", kit / "roster.json").key
        secrets[f"{name}/identity raw"] = identity.private_bytes_raw()
        review = serialization.load_ssh_private_key((kit / "review.key").read_bytes(), None)
        secrets[f"{name}/review raw"] = review.private_bytes_raw()  # type: ignore[union-attr]
    leaks = [
        f"{path} holds {which}"
        for path, data in written.items()
        for which, secret in secrets.items()
        if secret in data or secret.hex().encode() in data
    ]
    assert not leaks, leaks
    assert not any(
        b"PRIVATE KEY" in data for path, data in written.items() if "institutions" in path
    )
    assert {p for p in written if p.startswith("institutions/alpha/")} == {
        "institutions/alpha/node.pub",
        "institutions/alpha/identity.pub",
        "institutions/alpha/review.pub",
        "institutions/alpha/ca.crt",
    }


def test_kit_secrets_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fed = federation(tmp_path, ["alpha"])
    finally:
        os.umask(old)
    for secret in KIT_SECRETS:
        assert _mode(fed.kits["alpha"] / secret) == 0o600, secret
    for secret in COORDINATOR_SECRETS:
        assert _mode(fed.pki / secret) == 0o600, secret
    for public in ["ca.crt", "superlink/server.crt", "institutions/alpha/node.pub", "roster.json"]:
        assert _mode(fed.pki / public) == 0o644, public


def test_server_certificate_chains_to_the_ca_with_loopback_names(tmp_path: Path) -> None:
    pki = federation(tmp_path, ["alpha"]).pki
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


def test_node_keys_are_what_flower_reads_and_the_roster_holds_each_identity(
    tmp_path: Path,
) -> None:
    fed = federation(tmp_path, ["alpha", "beta"])
    kit = fed.kits["alpha"]
    # flower-supernode --auth-supernode-private-key reads an OpenSSH private key ...
    private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    # ... and `flwr supernode register`, at the coordinator, an OpenSSH public key.
    raw = try_load_public_key(fed.pki / "institutions/alpha/node.pub")
    assert raw == private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert set(registered_keys(fed.pki)) == {"alpha", "beta"}
    load_private_key(fed.pki / "coordinator/coordinator.key")  # the Ed25519 signing key
    roster = Roster.load(fed.pki / "roster.json")
    assert set(roster.keys) == {"alpha", "beta"}
    assert (kit / "roster.json").read_bytes() == (fed.pki / "roster.json").read_bytes()
    assert (kit / "ca.crt").read_bytes() == (fed.pki / "ca.crt").read_bytes()
    assert identity_from(kit / "identity.key", kit / "roster.json").name == "alpha"


def test_extra_hosts_keep_the_loopback_names(tmp_path: Path) -> None:
    provision(tmp_path, hosts=["fl.example.org", "10.0.0.7"])
    server = x509.load_pem_x509_certificate((tmp_path / "superlink/server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ips == {"10.0.0.7", "127.0.0.1"}


def test_existing_files_are_kept_and_a_new_institution_changes_the_roster(
    tmp_path: Path,
) -> None:
    fed = federation(tmp_path, ["alpha"])
    before = {s: (fed.pki / s).read_bytes() for s in COORDINATOR_SECRETS}
    old = Roster.load(fed.pki / "roster.json").fingerprint
    init_node(tmp_path / "gamma", "gamma")
    done = provision(fed.pki, [tmp_path / "gamma/request.json", fed.kits["alpha"] / "request.json"])
    assert {s: (fed.pki / s).read_bytes() for s in COORDINATOR_SECRETS} == before
    assert fed.pki / "institutions/alpha/identity.pub" in done.kept
    assert fed.pki / "institutions/gamma/identity.pub" in done.created
    assert Roster.load(fed.pki / "roster.json").fingerprint != old
    # alpha's kit still pins the old roster: it must pin the new one, naming its fingerprint
    new = Roster.load(fed.pki / "roster.json").fingerprint
    with pytest.raises(KitError, match="not SHA256:wrong"):
        pin(fed.kits["alpha"], fed.pki / "roster.json", fed.pki / "ca.crt", expect="SHA256:wrong")
    assert pin(fed.kits["alpha"], fed.pki / "roster.json", fed.pki / "ca.crt", expect=new)


def test_a_changed_key_needs_force_and_a_kit_refuses_a_roster_without_it(tmp_path: Path) -> None:
    fed = federation(tmp_path, ["alpha", "beta"])
    init_node(fed.kits["alpha"], "alpha", force=True)  # alpha lost its keys and made new ones
    with pytest.raises(ProvisionError, match="registered with other keys"):
        provision(fed.pki, [fed.kits["alpha"] / "request.json"])
    with pytest.raises(KitError, match="does not hold this kit's identity key"):
        pin(fed.kits["alpha"], fed.pki / "roster.json", fed.pki / "ca.crt")
    provision(fed.pki, [fed.kits["alpha"] / "request.json"], force=True)
    assert pin(fed.kits["alpha"], fed.pki / "roster.json", fed.pki / "ca.crt")


def test_a_request_with_anything_but_public_keys_is_refused(tmp_path: Path) -> None:
    init_node(tmp_path / "alpha", "alpha")
    request = json.loads((tmp_path / "alpha/request.json").read_text())
    request["node_key"] = (tmp_path / "alpha/node.key").read_text()
    (tmp_path / "leaky.json").write_text(json.dumps(request))
    with pytest.raises(KitError, match="unexpected fields"):
        provision(tmp_path / "pki", [tmp_path / "leaky.json"])


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    pki = federation(tmp_path, ["alpha"]).pki
    (pki / "ca.crt").unlink()
    with pytest.raises(ProvisionError, match="half a CA"):
        provision(pki)


@pytest.mark.parametrize("name", ["", "Alpha", "a b", "../x", "x" * 64])
def test_bad_institution_names_are_refused(name: str) -> None:
    with pytest.raises(ProvisionError, match="institution name"):
        check_name(name)


def test_cli_exits_2_on_bad_input_and_lists_what_it_kept(tmp_path: Path) -> None:
    fedaiot = [sys.executable, "-m", "fedaiot"]
    cli = [*fedaiot, "provision", "--out", str(tmp_path / "pki")]
    central = subprocess.run([*cli, "--institution", "alpha"], capture_output=True, text=True)
    assert central.returncode == 2 and "make their own keys" in central.stderr
    assert len(central.stderr.strip().splitlines()) == 1
    bad = subprocess.run(
        [*fedaiot, "node", "init", "--name", "Bad Name", "--kit", str(tmp_path / "k")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "institution name" in bad.stderr
    made = subprocess.run(
        [*fedaiot, "node", "init", "--name", "alpha", "--kit", str(tmp_path / "alpha")],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0 and "request fingerprint SHA256:" in made.stdout, made.stderr
    approve = ["--approve", str(tmp_path / "alpha/request.json")]
    first = subprocess.run([*cli, *approve], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "roster " in first.stdout and "SHA256:" in first.stdout
    again = subprocess.run([*cli, *approve], capture_output=True, text=True)
    assert again.returncode == 0 and "kept" in again.stdout and "created" not in again.stdout
