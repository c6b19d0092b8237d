"""A torch model to ONNX (``torch.onnx.export`` through onnxscript) and to int8
(``onnxruntime.quantization.quantize_dynamic``): the libraries' conversions, not ours.

The exported graph takes the raw input (what a caller sends) and returns probabilities: it
applies the manifest's standardization first and a softmax last, so a device needs nothing
but the artifact. The batch axis is dynamic.

Two clean-ups after each conversion, neither of which changes what the graph computes: every
node's metadata (the exporter writes the Python stack trace of each operation, with local file
paths) and the intermediate type annotations are dropped, and tensor names are shortened (the
float export spends more bytes on names than on the weights of a small model).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

OPSET = 18  # onnxruntime's quantizer fails on this exporter's opset 21 and 23 graphs
INPUT, OUTPUT = "input", "probabilities"


class Standardized(nn.Module):
    """``softmax(model((x - mean) / std))``: raw inputs in, probabilities out."""

    def __init__(
        self, model: nn.Module, mean: np.ndarray | None, std: np.ndarray | None, ndim: int
    ) -> None:
        super().__init__()
        self.model = model
        self.scaled = mean is not None and std is not None
        view = (1, -1) + (1,) * (ndim - 1)  # per feature / channel: the batch's axis 1
        m = torch.zeros(1) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        s = torch.ones(1) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", m.reshape(view))
        self.register_buffer("std", s.reshape(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            x = (x - self.mean) / self.std
        return torch.softmax(self.model(x), dim=1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the quantizer log progress and advice at warning level: not ours to
    show on every export."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop node metadata, doc strings and intermediate type annotations; shorten tensor names
    (graph inputs and outputs keep theirs)."""
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        node.name = ""
    del graph.value_info[:]
    del model.metadata_props[:]
    model.doc_string = graph.doc_string = ""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    onnx.checker.check_model(model)
    return model


def to_onnx(module: Standardized, input_shape: tuple[int, ...]) -> bytes:
    """The float ONNX graph of ``module`` (in eval mode), compacted."""
    module.eval()
    example = torch.zeros((1, *input_shape), dtype=torch.float32)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        if program is None:  # the dynamo exporter always returns a program
            raise RuntimeError("torch.onnx.export returned no program")
        program.optimize()
        model = program.model_proto
    return compact(model).SerializeToString()


def quantize_int8(float_model: bytes) -> bytes:
    """onnxruntime's dynamic quantization: int8 weights (per tensor), activations quantized on
    the fly; Conv becomes ConvInteger, Gemm and MatMul MatMulInteger. Compacted."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="fedaiot-quantize-") as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(float_model)
        with _quiet():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
        model = onnx.load_from_string(target.read_bytes())
    return compact(model).SerializeToString()
