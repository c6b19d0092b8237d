"""An onnxruntime session over an artifact's verified bytes: raw inputs in, probabilities out."""

from __future__ import annotations

import numpy as np


class OnnxRunner:
    """Runs a verified artifact (built from the very bytes that were hashed, never a path)."""

    def __init__(self, data: bytes, threads: int = 1, input_name: str = "input") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One intra-op thread: for these small models a pool only adds wake-ups (as for torch).
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(
            data, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = input_name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(x, dtype=np.float32)
        (probabilities,) = self._session.run(None, {self._input: batch})[:1]
        return np.asarray(probabilities, dtype=np.float32)
