"""A federation set up as deployment does it, in-process: each institution makes its own keys
(``node init``), the coordinator approves the requests (``provision --approve``), every
institution pins the roster and CA (``node pin``), and approves the app bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedaiot.deploy.bundle import approve, build_bundle, read_bundle
from fedaiot.deploy.institution_keys import REVIEW_KEY, init_node, pin, review_key_id
from fedaiot.deploy.provision import provision, write_file
from fedaiot.launch.flwr import project_dir


@dataclass(frozen=True)
class Federation:
    pki: Path
    kits: dict[str, Path]
    bundle: Path | None = None
    approvals: Path | None = None  # a folder of approvals, one per institution


def federation(root: Path, names: list[str], *, bundle: bool = False) -> Federation:
    kits = {name: root / "kits" / name for name in names}
    for name, kit in kits.items():
        init_node(kit, name)
    requests = [kit / "request.json" for kit in kits.values()]
    pki = root / "pki"
    provision(pki, requests)
    for kit in kits.values():
        pin(kit, pki / "roster.json", pki / "ca.crt")
    if not bundle:
        return Federation(pki, kits)
    built = read_bundle(build_bundle(project_dir(), root / "bundles"))
    approvals = root / "approvals"
    for name, kit in kits.items():
        approval = approve(built, kit / REVIEW_KEY, review_key_id(name))
        write_file(
            approvals / f"{name}.json", approval.to_json().encode(), secret=False, force=True
        )
    return Federation(pki, kits, built.path, approvals)
