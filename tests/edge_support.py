"""Helpers of the edge tests: a signed registry holding a briefly trained model of a task."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.experiments.central import train_central
from fedaiot.registry.store import Manifest, ModelRegistry, version_name
from fedaiot.tasks import federate, get_task

SEED = 42


def trained_registry(
    root: Path, key: Ed25519PrivateKey, task_name: str, epochs: int, run: str = "edge"
) -> tuple[ModelRegistry, str]:
    """A registry with one signed version of ``task_name`` trained centrally (non-private) for
    ``epochs`` on the pool of the seed's split, as a federated run with that seed would hold it."""
    outcome = train_central(
        task_name, None, epochs=epochs, batch_size=64, learning_rate=0.1, max_grad_norm=1.0,
        seed=SEED,
    )  # fmt: skip
    task = get_task(task_name)
    held_out = federate(task, 1, partitioner="iid", seed=SEED)
    registry = ModelRegistry(root, signing_key=key)
    version = version_name(run, 1)
    registry.register(
        outcome.model.state_dict(),
        Manifest(
            version=version,
            run=run,
            task=task.name,
            architecture=task.architecture,
            input_schema=task.input_schema(held_out.normalization),
            round=1,
            metrics=outcome.metrics,
            config={"task": task.name, "seed": SEED},
            weights_sha256="",
            created=time.time(),
        ),
    )
    registry.set_refs(latest=version, best=version)
    return registry, version
