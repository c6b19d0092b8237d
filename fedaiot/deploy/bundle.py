"""App bundles (Flower FABs): built by the coordinator, read and signed by the institutions.

A deployed node runs the code of the bundle its SuperNode receives. ``flower-supernode
--trusted-entities`` runs a bundle only if one of the keys it lists signed it: Ed25519 over
``signed_at`` (8 bytes, big-endian) followed by the bundle's SHA-256, Flower 1.41's own format
(``flwr.supercore.primitives.asymmetric_ed25519``). ``fedaiot node approve`` shows a bundle
(every file and its SHA-256, the run-config keys the coordinator may set) and signs it with the
institution's review key; the coordinator collects the approvals and serves them with the
bundle (``deploy.app_index``).

What a signature covers: the bundle's bytes, hence every file in it and the default run config.
What it does not: the run-config *values* the coordinator sets at submission, which is why the
approval lists the keys it may set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.deploy.provision import write_file
from fedaiot.deploy.superlink import KitError
from fedaiot.secagg import SecAggError
from fedaiot.secagg.authentication import load_public, openssh_line

APPROVAL_FORMAT = "fedaiot-approval/1"
_MANIFEST = ".info/CONTENT"


def signed_message(fab_sha256: bytes, signed_at: int) -> bytes:
    """What a bundle signature covers; Flower's SuperNode verifies exactly this."""
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    return create_message_to_sign(fab_sha256, signed_at)


@dataclass(frozen=True)
class BundleFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Bundle:
    """What a bundle holds, checked against its own CONTENT manifest."""

    path: Path
    sha256: str
    app_id: str  # "@publisher/name", as ``flwr run`` names a published app
    version: str
    components: dict[str, str]
    config: dict[str, Any]  # the run config's keys and defaults (flattened, as Flower does)
    files: list[BundleFile]

    @property
    def spec(self) -> str:
        return f"{self.app_id}=={self.version}"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def read_bundle(path: Path) -> Bundle:
    """A bundle's contents; KitError if it is no FAB or a file differs from its manifest."""
    path = Path(path)
    try:
        data = path.read_bytes()
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = [n for n in archive.namelist() if n != _MANIFEST]
        contents = {n: archive.read(n) for n in names}
        manifest = archive.read(_MANIFEST).decode()
        config = tomllib.loads(contents["pyproject.toml"].decode())
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise KitError(f"{path} is not a Flower app bundle: {exc}") from None
    listed = {}
    for line in manifest.splitlines():
        name, digest, bits = line.rsplit(",", 2)
        listed[name] = (digest, int(bits))
    files = [BundleFile(n, hashlib.sha256(c).hexdigest(), len(c)) for n, c in contents.items()]
    for f in files:
        if listed.get(f.path) != (f.sha256, 8 * f.size):
            raise KitError(f"{path}: {f.path} does not match the bundle's CONTENT manifest")
    if set(listed) != set(contents):
        raise KitError(f"{path}: its CONTENT manifest lists other files than it holds")
    try:
        app = config["tool"]["flwr"]["app"]
        project = config["project"]
        app_id = f"@{app['publisher']}/{project['name']}"
        return Bundle(
            path,
            hashlib.sha256(data).hexdigest(),
            app_id,
            str(project["version"]),
            dict(app.get("components", {})),
            _flatten(app.get("config", {})),
            sorted(files, key=lambda f: f.path),
        )
    except (KeyError, TypeError) as exc:
        raise KitError(f"{path}: its pyproject.toml lacks {exc}") from None


def build_bundle(project: Path, out_dir: Path) -> Path:
    """The bundle ``flwr run`` would build from ``project``, written to ``out_dir``."""
    from flwr.cli.build import build_fab_from_disk, get_fab_filename

    try:
        data = build_fab_from_disk(Path(project))
    except ValueError as exc:
        raise KitError(f"cannot build the app bundle from {project}: {exc}") from None
    config = tomllib.loads((Path(project) / "pyproject.toml").read_text())
    path = Path(out_dir) / get_fab_filename(config, hashlib.sha256(data).hexdigest())
    write_file(path, data, secret=False, force=True)
    return path


@dataclass(frozen=True)
class Approval:
    """One key's signature over one bundle: what an institution sends the coordinator."""

    key_id: str
    public_key: str  # ssh-ed25519 line
    fab_sha256: str
    signed_at: int
    signature: str  # base64url, unpadded, as Flower decodes it

    def to_json(self) -> str:
        return json.dumps({"format": APPROVAL_FORMAT, **self.__dict__}, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Approval:
        try:
            raw = json.loads(Path(path).read_text())
            if raw.pop("format") != APPROVAL_FORMAT:
                raise ValueError(f"not {APPROVAL_FORMAT}")
            approval = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise KitError(f"approval {path} is unreadable: {exc}") from None
        return approval

    def verifies(self, bundle_sha256: str) -> bool:
        """Whether this is a valid signature by ``public_key`` over that bundle."""
        if self.fab_sha256 != bundle_sha256:
            return False
        try:
            key = load_public(self.public_key, self.key_id)
            signature = base64.urlsafe_b64decode(self.signature + "=" * (-len(self.signature) % 4))
            key.verify(signature, signed_message(bytes.fromhex(bundle_sha256), self.signed_at))
        except (SecAggError, ValueError, InvalidSignature):
            return False
        return True

    def record(self) -> dict[str, Any]:
        """This signature as Flower's SuperLink passes it on to the SuperNodes."""
        return {
            "public_key_id": self.key_id,
            "signature": self.signature,
            "signed_at": self.signed_at,
        }


def approve(bundle: Bundle, review_key: Path, key_id: str) -> Approval:
    """Sign ``bundle`` with the review key at ``review_key`` (OpenSSH Ed25519)."""
    try:
        key = serialization.load_ssh_private_key(Path(review_key).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KitError(f"review key {review_key} is unreadable: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KitError(f"review key {review_key} is not an Ed25519 key")
    signed_at = int(time.time())
    raw = key.sign(signed_message(bytes.fromhex(bundle.sha256), signed_at))
    signature = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    public = openssh_line(key.public_key())
    return Approval(key_id, public, bundle.sha256, signed_at, signature)
