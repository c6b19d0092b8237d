"""``fedaiot export``: a registry version as a signed ONNX artifact for devices."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedaiot.errors import BadInputError
from fedaiot.registry.signing import PRIVATE_KEY_FILE, SIGNING_KEY_ENV


class Format(StrEnum):
    onnx = "onnx"


class Quantize(StrEnum):
    none = "none"
    int8 = "int8"


def export(
    registry: Annotated[Path, typer.Argument(help="the model registry")],
    version: Annotated[str, typer.Argument(help="the version to export")],
    format: Annotated[Format, typer.Option("--format", help="the artifact's format")] = Format.onnx,
    quantize: Annotated[
        Quantize, typer.Option(help="int8: onnxruntime's dynamic quantization")
    ] = Quantize.none,
    key: Annotated[
        Path | None,
        typer.Option(
            help=f"the coordinator's private key (default ${SIGNING_KEY_ENV}, "
            f"else keys/{PRIVATE_KEY_FILE})"
        ),
    ] = None,
) -> None:
    """Export a verified version to ONNX (float or int8), with its parity against the torch
    model on the task's held-out test set, signed with the coordinator's key."""
    from fedaiot.edge.build import export_version
    from fedaiot.registry.signing import load_private_key

    if not registry.is_dir():
        raise BadInputError(f"model registry {registry} not found")
    key = key or Path(os.environ.get(SIGNING_KEY_ENV) or Path("keys") / PRIVATE_KEY_FILE)
    artifact, path = export_version(registry, version, load_private_key(key), quantize.value)
    parity = artifact.parity
    sizes = artifact.reference_sizes
    print(f"{path} ({artifact.size_bytes:,} bytes, signed: {path.with_suffix('.sig').name})")
    print(
        f"size: {artifact.size_bytes / sizes['onnx_float']:.1%} of the float ONNX graph "
        f"({sizes['onnx_float']:,} bytes), {artifact.size_bytes / sizes['torch_safetensors']:.1%}"
        f" of the torch weights ({sizes['torch_safetensors']:,} bytes)"
    )
    print(
        f"parity on the {parity.evaluation_set}: largest probability difference "
        f"{parity.max_abs_probability_difference:.2e}, labels agree on "
        f"{parity.label_agreement:.2%}, accuracy {parity.accuracy_torch:.2%} -> "
        f"{parity.accuracy_artifact:.2%} ({parity.accuracy_change_points:+.2f} points)"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
