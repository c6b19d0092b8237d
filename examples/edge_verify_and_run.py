#!/usr/bin/env python3
"""Fetch a fedaiot edge artifact, verify it, and only then run it. For devices.

Needs onnxruntime, numpy and cryptography, nothing of fedaiot. The checks, in this order: the
coordinator's Ed25519 signature over the artifact's manifest (the exact bytes received), that
the manifest names the version and artifact asked for, and the SHA-256 and size of the model
file against the manifest. onnxruntime is then given the very bytes that were hashed.

    # from the service, with a device token
    python edge_verify_and_run.py --public-key coordinator.pub --version bc-r0015 \\
        --artifact onnx-int8 --url http://127.0.0.1:8000 --token "$TOKEN" --input rows.json
    # from files copied to the device (<artifact>.onnx, .json, .sig in one folder)
    python edge_verify_and_run.py --public-key coordinator.pub --version bc-r0015 \\
        --artifact onnx-int8 --dir edge/ --input rows.json

``rows.json`` is a list of instances, each a list of the model's raw input values (flattened
in C order), as ``POST /v1/predict`` takes them. It prints one JSON object with the labels and
probabilities. A refused artifact prints one line, ``refused: <why>``, on stderr and exits 1;
bad arguments or input exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FORMAT = "fedaiot-edge/1"
MAX_BYTES = 64 << 20  # no artifact of ours comes near this
TIMEOUT = 30.0


class Refused(Exception):
    """The artifact must not be run."""


def fetch(url: str, version: str, name: str, token: str) -> tuple[bytes, bytes, bytes]:
    """The model, manifest and signature bytes from the service (device or admin token)."""
    base = f"{url.rstrip('/')}/v1/models/{version}/artifacts/{name}"
    found = []
    for suffix in ("", "/manifest", "/signature"):
        headers = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(base + suffix, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                data = answer.read(MAX_BYTES + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", errors="replace")
            where = base + suffix
            raise Refused(f"the service answered {exc.code} for {where}: {detail}") from None
        if len(data) > MAX_BYTES:
            raise Refused(f"{base + suffix} is larger than {MAX_BYTES} bytes")
        found.append(data)
    return found[0], found[1], found[2]


def read_dir(folder: Path, name: str) -> tuple[bytes, bytes, bytes]:
    try:
        return tuple(  # type: ignore[return-value]
            (folder / f"{name}{suffix}").read_bytes() for suffix in (".onnx", ".json", ".sig")
        )
    except OSError as exc:
        raise Refused(f"cannot read the artifact: {exc.strerror}: {exc.filename}") from None


def verify(
    model: bytes, manifest_bytes: bytes, signature: bytes, key: Ed25519PublicKey, version: str,
    name: str,
) -> dict[str, Any]:  # fmt: skip
    """The artifact's manifest, once the signature, the names and the hash all hold."""
    try:
        raw = bytes.fromhex(signature.decode("ascii").strip())
        key.verify(raw, manifest_bytes)
    except (ValueError, UnicodeDecodeError, InvalidSignature):
        raise Refused(
            "the manifest's signature does not verify with the coordinator's key"
        ) from None
    manifest = json.loads(manifest_bytes)
    if manifest.get("format") != FORMAT or manifest.get("model_format") != "onnx":
        raise Refused(f"unsupported artifact format {manifest.get('format')!r}")
    if manifest.get("version") != version or manifest.get("name") != name:
        raise Refused(
            f"the signed manifest is for {manifest.get('name')} of {manifest.get('version')}, "
            f"not {name} of {version}"
        )
    digest = hashlib.sha256(model).hexdigest()
    if digest != manifest.get("sha256") or len(model) != manifest.get("size_bytes"):
        raise Refused(
            f"the model file's SHA-256 {digest[:12]} is not the signed {manifest['sha256'][:12]}:"
            " corrupt or tampered"
        )
    return manifest


def run(model: bytes, manifest: dict[str, Any], rows: list[list[float]]) -> list[dict[str, Any]]:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    shape = manifest["input_shape"]
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), *shape)
    (probabilities,) = session.run([manifest["output_name"]], {manifest["input_name"]: x})
    names = manifest["class_names"]
    return [
        {
            "label": names[int(p.argmax())],
            "class_index": int(p.argmax()),
            "probabilities": {n: round(float(v), 4) for n, v in zip(names, p, strict=True)},
        }
        for p in probabilities
    ]


def load_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public-key", type=Path, required=True, help="coordinator.pub")
    parser.add_argument("--version", required=True, help="the model version")
    parser.add_argument("--artifact", default="onnx-int8", help="onnx or onnx-int8")
    parser.add_argument("--url", help="the fedaiot service (with --token)")
    parser.add_argument("--token", help="a device (or admin) bearer token")
    parser.add_argument("--dir", type=Path, help="a folder holding the three files instead")
    parser.add_argument("--input", type=Path, required=True, help="rows as JSON ('-': stdin)")
    args = parser.parse_args(argv)
    if (args.url is None) == (args.dir is None) or (args.url is not None and not args.token):
        print("error: give either --url and --token, or --dir", file=sys.stderr)
        return 2
    try:
        key = load_key(args.public_key)
        text = sys.stdin.read() if str(args.input) == "-" else args.input.read_text()
        rows = json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.url is not None:
            files = fetch(args.url, args.version, args.artifact, args.token)
        else:
            files = read_dir(args.dir, args.artifact)
        manifest = verify(*files, key, args.version, args.artifact)
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # the network, or a manifest that is not JSON
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    try:
        predictions = run(files[0], manifest, rows)
    except (ValueError, TypeError) as exc:
        print(f"error: the rows do not fit the model's input {manifest['input_shape']}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(json.dumps({"version": args.version, "artifact": args.artifact,
                      "predictions": predictions}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
