"""Approved code only: what ``node approve`` shows and signs, checked with Flower's own code.

The path a signature takes in a deployment, in-process: the coordinator's app index answers
Flower's own request for a published app (``request_download_link``), the SuperLink formats the
verifications as Flower does, and the SuperNode's check (``_verify_fab``) reads the kit's trust
file. tests/test_deploy_e2e.py runs the same path through real processes.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from flwr.supercore.fab import Fab
from flwr.supercore.utils import request_download_link
from flwr.superlink.servicer.control.control_handlers import _format_verification
from flwr.supernode.start_client_internal import _verify_fab
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.deploy.app_index import serve_bundle
from fedaiot.deploy.bundle import Approval, approve, read_bundle
from fedaiot.deploy.coordinator_kit import check_approvals
from fedaiot.deploy.institution_keys import REVIEW_KEY, init_node, trust_publisher
from fedaiot.deploy.node_console import RefusalWatcher
from fedaiot.deploy.superlink import CoordinatorPaths, KitError
from fedaiot.deploy.supernode import NodeKit
from tests.deploy_support import Federation, federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return federation(tmp_path_factory.mktemp("trust"), ["alpha", "beta"], bundle=True)


def _trusted(kit: Path) -> dict[str, str]:
    return yaml.safe_load((kit / "trusted-entities.yaml").read_text())  # as Flower reads it


def _through_flower(bundle: Path, approvals: list[Approval]) -> Fab:
    """What a SuperNode receives: the SuperLink fetched the bundle from the coordinator's app
    index, with Flower's own functions, and formatted the verifications as it does."""
    shown = read_bundle(bundle)
    with serve_bundle(shown, approvals) as index:
        url, verifications, _ = request_download_link(
            shown.app_id, shown.version, f"{index}/hub/fetch-fab", "fab_url"
        )
        content = httpx.get(url).content
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@other/app", None, f"{index}/hub/fetch-fab", "fab_url")
    assert verifications is not None
    return Fab(shown.sha256, content, _format_verification(verifications))


def test_an_approved_bundle_passes_flowers_check_and_others_do_not(
    fed: Federation, tmp_path: Path
) -> None:
    assert fed.bundle and fed.approvals
    approvals = [Approval.load(p) for p in sorted(fed.approvals.glob("*.json"))]
    fab = _through_flower(fed.bundle, approvals)
    assert fab.content == fed.bundle.read_bytes()
    for kit in fed.kits.values():
        assert _verify_fab(fab, _trusted(kit))
    # another bundle with the same approvals: the signatures do not cover it
    other = tmp_path / "other.fab"
    shutil.copy(fed.bundle, other)
    with zipfile.ZipFile(other, "a") as archive:
        archive.writestr("clients/exfiltrate.py", "import os\n")
    relabelled = Fab("x", other.read_bytes(), fab.verifications)
    assert not _verify_fab(relabelled, _trusted(fed.kits["alpha"]))
    # signed, but by a key no institution listed (the coordinator's own, say)
    init_node(tmp_path / "mallory", "mallory")
    rogue = approve(read_bundle(fed.bundle), tmp_path / "mallory" / REVIEW_KEY, "alpha-review")
    assert not _verify_fab(_through_flower(fed.bundle, [rogue]), _trusted(fed.kits["alpha"]))
    # ... unless the institution chose to trust that publisher
    kit = tmp_path / "trusting"
    shutil.copytree(fed.kits["beta"], kit)
    trust_publisher(kit, "mallory", tmp_path / "mallory" / "review.pub")
    signed = approve(read_bundle(fed.bundle), tmp_path / "mallory" / REVIEW_KEY, "mallory")
    assert _verify_fab(_through_flower(fed.bundle, [signed]), _trusted(kit))


def test_node_approve_shows_files_hashes_and_run_config_keys(
    fed: Federation, tmp_path: Path
) -> None:
    assert fed.bundle
    out = tmp_path / "approval.json"
    args = ["node", "approve", str(fed.bundle), "--kit", str(fed.kits["alpha"]), "--out", str(out)]
    refused = CliRunner().invoke(app, args, input="n\n")
    assert refused.exit_code == 2 and not out.exists()
    shown = CliRunner().invoke(app, args, input="y\n")
    assert shown.exit_code == 0, shown.output
    bundle = read_bundle(fed.bundle)
    assert bundle.sha256 in shown.output and bundle.spec in shown.output
    client_app = next(f for f in bundle.files if f.path == "clients/client_app.py")
    assert f"{client_app.sha256}  {client_app.size:>8}  clients/client_app.py" in shown.output
    for key in ("epsilon", "seeded-noise", "secagg-collusion", "node-roster"):
        assert f"  {key} (default " in shown.output
    approval = Approval.load(out)
    assert approval.key_id == "alpha-review" and approval.verifies(bundle.sha256)


def test_a_bundle_that_differs_from_its_manifest_is_refused(
    fed: Federation, tmp_path: Path
) -> None:
    assert fed.bundle
    forged = tmp_path / "forged.fab"
    with zipfile.ZipFile(fed.bundle) as source, zipfile.ZipFile(forged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "clients/client_app.py":
                data += b"\nimport os  # something the manifest does not list\n"
            target.writestr(item, data)
    with pytest.raises(KitError, match=r"client_app\.py does not match the bundle.s CONTENT"):
        read_bundle(forged)


def test_the_coordinator_checks_approvals_before_it_starts(fed: Federation, tmp_path: Path) -> None:
    assert fed.bundle and fed.approvals
    paths = CoordinatorPaths(fed.pki, tmp_path / "state")
    bundle = read_bundle(fed.bundle)
    approvals = {p.stem: Approval.load(p) for p in fed.approvals.glob("*.json")}
    notes = check_approvals(paths, bundle, list(approvals.values()))
    assert notes == [f"institution {n}: approved {bundle.spec}" for n in ("alpha", "beta")]
    only_alpha = check_approvals(paths, bundle, [approvals["alpha"]])
    assert "institution beta: no approval of its own" in only_alpha[1]
    init_node(tmp_path / "mallory", "mallory")
    posing = approve(bundle, tmp_path / "mallory" / REVIEW_KEY, "beta-review")
    with pytest.raises(KitError, match="not signed by beta's registered review key"):
        check_approvals(paths, bundle, [posing])
    broken = Approval(**{**approvals["alpha"].__dict__, "signed_at": 1})
    with pytest.raises(KitError, match="not a valid signature"):
        check_approvals(paths, bundle, [broken])
    with pytest.raises(KitError, match="no approval"):
        check_approvals(paths, bundle, [])


def test_the_console_says_each_refused_run_once(tmp_path: Path) -> None:
    said: list[str] = []
    watcher = RefusalWatcher(tmp_path / "log", 0, ["alpha-review"], said.append)
    lines = [
        "\x1b[92mINFO \x1b[0m:      [RUN 41]",
        "\x1b[91mERROR \x1b[0m:     The FAB could not be verified. App verification is not "
        "supported by the connected SuperLink.",
        "INFO :      [RUN 41]",
        "ERROR :     The FAB could not be verified. App verification is not supported by the "
        "connected SuperLink.",
        "INFO :      [RUN 42, ROUND 1]",
        "ERROR :     FAB verification failed: the provided trusted entities could not verify the "
        "FAB. An error reply has been generated.",
    ]
    (tmp_path / "log").write_text("\n".join(lines[:3]))  # the last line still being written
    watcher.poll()
    with open(tmp_path / "log", "a") as log:
        log.write("\n" + "\n".join(lines[3:]) + "\n")
    watcher.poll()
    assert said == [
        "refused run 41: its app bundle carries no signature (trusted: alpha-review); none of "
        "its code ran",
        "refused run 42: its app bundle is signed by no key this institution trusts (trusted: "
        "alpha-review); none of its code ran",
    ]


def test_a_kit_missing_its_roster_or_with_a_readable_key_is_refused(
    fed: Federation, tmp_path: Path
) -> None:
    kit = tmp_path / "kit"
    shutil.copytree(fed.kits["alpha"], kit)
    assert NodeKit(kit).check().name == "alpha"
    (kit / "identity.key").chmod(0o644)
    with pytest.raises(KitError, match=r"identity\.key is readable by others"):
        NodeKit(kit).check()
    (kit / "identity.key").chmod(0o600)
    (kit / "roster.json").unlink()
    with pytest.raises(KitError, match="make it with `fedaiot node pin`"):
        NodeKit(kit).check()
    # a roster of another federation does not hold this kit's key
    other = federation(tmp_path / "elsewhere", ["alpha"])
    shutil.copy(other.pki / "roster.json", kit / "roster.json")
    with pytest.raises(Exception, match="does not hold this node's identity key"):
        NodeKit(kit).check()
    assert json.loads((kit / "request.json").read_text())["institution"] == "alpha"


def test_the_console_says_each_refused_round_once(tmp_path: Path) -> None:
    """The kit's runner logs a refusal through two handlers: it is one refusal."""
    said: list[str] = []
    watcher = RefusalWatcher(tmp_path / "log", 0, ["alpha-review"], said.append)
    why = "node 2 (alpha) refuses the round: the public keys relayed for node 3 (gamma) are bad"
    failed = f"fedaiot node: query.secagg_share failed (protocol-error): AuthenticationError: {why}"
    lines = [
        "INFO :      [RUN 7, ROUND 1]",
        f"WARNING fedaiot.node.round: {failed}",
        f"11/30/2026 18:29:09:WARNING:{failed}",
        "INFO :      [RUN 8, ROUND 1]",
        f"WARNING fedaiot.node.round: {failed}",
    ]
    (tmp_path / "log").write_text("\n".join(lines) + "\n")
    watcher.poll()
    assert said == [
        f"refused a secure round of run 7: {why}",
        f"refused a secure round of run 8: {why}",
    ]
