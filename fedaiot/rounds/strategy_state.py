"""The server optimizer's state, kept next to the registry so a resumed run goes on exactly.

FedAvg and FedProx hold no state between rounds; FedAdam (Flower's ``FedOpt`` family) holds the
first and second moments ``m_t`` and ``v_t``, FedAvgM its momentum vector. They are saved as
safetensors (no pickle) after each registered round, tagged with that round, and restored only
when the tag matches the round the run resumes after.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

MOMENTS = ("m_t", "v_t")
MOMENTUM = "momentum"


def save_moments(strategy: FedAvg, path: Path, server_round: int) -> None:
    tensors: dict[str, np.ndarray] = {}
    if isinstance(strategy, FedOpt):
        for name in MOMENTS:
            for key, value in (getattr(strategy, name) or {}).items():
                tensors[f"{name}/{key}"] = np.ascontiguousarray(value)
    elif isinstance(strategy, FedAvgM):
        for index, value in enumerate(strategy.momentum_vector or []):
            tensors[f"{MOMENTUM}/{index:05d}"] = np.ascontiguousarray(value)
    if not tensors:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"round": str(server_round)})
    os.replace(tmp, path)


def load_moments(strategy: FedAvg, path: Path, server_round: int) -> bool:
    """Restore the moments saved after ``server_round``; False if there are none for it."""
    if not isinstance(strategy, FedOpt | FedAvgM) or not path.exists():
        return False
    with safe_open(str(path), framework="numpy") as handle:
        if (handle.metadata() or {}).get("round") != str(server_round):
            return False
    tensors = load_file(str(path))
    if isinstance(strategy, FedAvgM):
        prefix = f"{MOMENTUM}/"
        kept = sorted(k for k in tensors if k.startswith(prefix))
        strategy.momentum_vector = [tensors[k] for k in kept] or None
        return True
    for name in MOMENTS:
        prefix = f"{name}/"
        moments = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        setattr(strategy, name, moments or None)
    return True
