"""``fedaiot provision --approve REQUEST``: the coordinator admits an institution from the
public keys it sent, and rebuilds the federation roster every institution pins.

The roster (``roster.json``) lists each institution's identity key; its fingerprint is printed
here and by every institution's kit, for the institutions to compare out of band. The
coordinator distributes the roster but cannot change it without every kit noticing.
"""

from __future__ import annotations

from pathlib import Path

from fedaiot.deploy.institution_keys import IDENTITY_PUB, REVIEW_PUB, ROSTER, NodeRequest
from fedaiot.deploy.provision import (
    CA_CERT,
    INSTITUTIONS,
    NODE_PUB,
    Provisioned,
    ProvisionError,
    institution_dir,
    write_file,
)
from fedaiot.secagg import Roster


def _public_files(request: NodeRequest) -> dict[str, str]:
    return {NODE_PUB: request.node, IDENTITY_PUB: request.identity, REVIEW_PUB: request.review}


def register_requests(
    root: Path, requests: list[Path], ca_pem: bytes, done: Provisioned, *, force: bool
) -> None:
    """Write each request's public keys under ``institutions/<name>/`` and the roster.

    An institution already registered with other keys is refused unless ``force``: its new
    identity changes the roster, and every institution must then pin the new one.
    """
    loaded = [NodeRequest.load(path) for path in requests]
    names = [r.institution for r in loaded]
    if len(set(names)) != len(names):
        raise ProvisionError(f"two requests name the same institution: {sorted(names)}")
    for request in loaded:
        folder = institution_dir(root, request.institution)
        wanted = {name: (line + "\n").encode() for name, line in _public_files(request).items()}
        held = {n: (folder / n).read_bytes() for n in wanted if (folder / n).exists()}
        if held and held != wanted and not force:
            raise ProvisionError(
                f"{request.institution} is registered with other keys: approve its new request "
                "with --force (the roster changes, and every institution must pin it again)"
            )
        for name, data in wanted.items():
            if held.get(name) == data:
                done.kept.append(folder / name)
            else:
                write_file(folder / name, data, secret=False, force=True)
                done.created.append(folder / name)
    for folder in sorted((Path(root) / INSTITUTIONS).glob("*/")):
        if (folder / IDENTITY_PUB).exists() and (
            not (folder / CA_CERT).exists() or (folder / CA_CERT).read_bytes() != ca_pem
        ):
            write_file(folder / CA_CERT, ca_pem, secret=False, force=True)
    write_roster(root, done)


def roster_of(root: Path) -> Roster | None:
    """The roster of every registered institution's identity key, or None before any."""
    lines = {
        path.parent.name: path.read_text().strip()
        for path in sorted((Path(root) / INSTITUTIONS).glob(f"*/{IDENTITY_PUB}"))
    }
    return Roster.from_lines(lines) if lines else None


def write_roster(root: Path, done: Provisioned) -> None:
    roster = roster_of(root)
    if roster is None:
        return
    path = Path(root) / ROSTER
    text = roster.to_json().encode()
    if path.exists() and path.read_bytes() == text:
        done.kept.append(path)
        return
    write_file(path, text, secret=False, force=True)
    done.created.append(path)
