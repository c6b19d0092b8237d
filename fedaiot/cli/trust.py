"""Keys made where they are used, and code run only once approved: ``fedaiot node init|pin|
trust|approve`` for an institution, ``fedaiot coordinator bundle`` for the coordinator.

Every refusal is one line with exit status 2 (``fedaiot.errors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedaiot.errors import BadInputError

Kit = Annotated[Path, typer.Option(help="the institution's kit folder (`fedaiot node init`)")]


def node_init(
    name: Annotated[str, typer.Option(help="the institution's name in the federation")],
    kit: Kit = Path("kit"),
    force: Annotated[bool, typer.Option(help="replace existing keys (approve them again)")] = False,
) -> None:
    """Make this institution's keys here (private parts 0600) and the request to send."""
    from fedaiot.deploy.institution_keys import REQUEST, SECRETS, init_node

    request = init_node(kit, name, force=force)
    for secret in SECRETS:
        print(f"created {kit / secret}  (secret, 0600: never leaves this machine)")
    print(f"send {kit / REQUEST} to the coordinator (public keys only)")
    print(f"request fingerprint {request.fingerprint}: read it to the coordinator to compare")


def node_pin(
    roster: Annotated[Path, typer.Option(help="the federation roster the coordinator sent")],
    ca: Annotated[Path, typer.Option(help="the federation's CA certificate (ca.crt)")],
    kit: Kit = Path("kit"),
    fingerprint: Annotated[
        str, typer.Option(help="the fingerprint the other institutions read you (SHA256:...)")
    ] = "",
) -> None:
    """Pin the federation roster (after comparing its fingerprint) and the CA into the kit."""
    from fedaiot.deploy.institution_keys import pin

    pinned = pin(kit, roster, ca, expect=fingerprint)
    names = ", ".join(sorted(pinned.keys))
    print(f"pinned roster {pinned.fingerprint} ({len(pinned.keys)} institutions: {names})")
    if not fingerprint:
        print("compare this fingerprint with every other institution's, out of band")


def node_trust(
    key_id: Annotated[str, typer.Option("--name", help="the publisher's name in trust files")],
    key: Annotated[Path, typer.Option(help="its ssh-ed25519 public key file")],
    kit: Kit = Path("kit"),
) -> None:
    """Also run app bundles signed by a publisher this institution trusts."""
    from fedaiot.deploy.institution_keys import trust_publisher

    entries = trust_publisher(kit, key_id, key)
    print(f"this node runs app bundles signed by: {', '.join(sorted(entries))}")


def node_approve(
    bundle: Annotated[Path, typer.Argument(help="the app bundle (.fab) the coordinator sent")],
    kit: Kit = Path("kit"),
    review_key: Annotated[
        Path | None, typer.Option(help="the review key, if not in the kit (review.key)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="where to write the approval")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="sign without asking")] = False,
) -> None:
    """Show what BUNDLE contains and sign it with this institution's review key."""
    from fedaiot.deploy.bundle import approve, read_bundle
    from fedaiot.deploy.institution_keys import REQUEST, REVIEW_KEY, NodeRequest, review_key_id
    from fedaiot.deploy.provision import write_file

    shown = read_bundle(bundle)
    print(f"bundle {shown.path.name}: {shown.spec}, SHA-256 {shown.sha256}")
    print(f"runs: {', '.join(f'{k} = {v}' for k, v in sorted(shown.components.items()))}")
    print(f"{len(shown.files)} files (SHA-256, bytes):")
    for f in shown.files:
        print(f"  {f.sha256}  {f.size:>8}  {f.path}")
    print(f"run-config keys the coordinator may set at each run ({len(shown.config)}):")
    for key, default in sorted(shown.config.items()):
        print(f"  {key} (default {default!r})")
    if not yes and not typer.confirm("sign this bundle as approved?", err=True):
        raise BadInputError("not approved: nothing was signed")
    institution = NodeRequest.load(kit / REQUEST).institution
    approval = approve(shown, review_key or kit / REVIEW_KEY, review_key_id(institution))
    target = out or shown.path.with_name(f"{shown.path.name}.{institution}.approval.json")
    write_file(target, approval.to_json().encode(), secret=False, force=True)
    print(f"approved: send {target} to the coordinator")


def coordinator_bundle(
    out: Annotated[Path, typer.Option(help="folder to write the bundle to")] = Path("bundles"),
) -> None:
    """Build the app bundle of this installation, for the institutions to review and sign."""
    from fedaiot.deploy.bundle import build_bundle, read_bundle
    from fedaiot.launch.flwr import project_dir

    built = read_bundle(build_bundle(project_dir(), out))
    print(f"built {built.path} ({built.spec}, {len(built.files)} files)")
    print(f"SHA-256 {built.sha256}: send it to every institution to approve")


def register(node_app: typer.Typer, coordinator_app: typer.Typer) -> None:
    node_app.command("init")(node_init)
    node_app.command("pin")(node_pin)
    node_app.command("trust")(node_trust)
    node_app.command("approve")(node_approve)
    coordinator_app.command("bundle")(coordinator_bundle)
