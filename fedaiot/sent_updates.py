"""The last update a node sent, kept so that a repeated request is answered without a new release.

When a coordinator restarts mid-round it asks the nodes for that round again. Training again
would release a second noisy update of the same data, which DP must charge again, and a node
whose noise is planned to spend its budget exactly would then refuse. Instead the node sends the
very update it already released, which costs nothing more. The file sits next to the ledger, in
safetensors (never pickle), and is written before the reply leaves the node.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]


def state_digest(state: StateDict) -> str:
    """SHA-256 of a model state: names, shapes, dtypes and bytes, in key order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SentUpdate:
    run: str
    round: int
    digest: str  # of the global model the update was trained from
    state: StateDict
    metrics: dict[str, float]

    @staticmethod
    def path_for(ledger_path: Path) -> Path:
        return ledger_path.with_name(ledger_path.stem + ".last-update.safetensors")

    def write(self, path: Path) -> None:
        metadata = {
            "run": self.run,
            "round": str(self.round),
            "digest": self.digest,
            "metrics": json.dumps(self.metrics),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state.items()}, tmp, metadata)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path, run: str, server_round: int) -> SentUpdate | None:
        """The update sent for ``(run, server_round)``, or None (none, another round, unreadable).

        An unreadable file is treated as absent, which errs towards charging again.
        """
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("run") != run or metadata.get("round") != str(server_round):
                    return None
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metrics = {str(k): float(v) for k, v in json.loads(metadata["metrics"]).items()}
            return cls(run, server_round, metadata["digest"], state, metrics)
        except (SafetensorError, OSError, ValueError, KeyError):
            return None
