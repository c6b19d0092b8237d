"""The served model: one reference read lock-free by requests, swapped under a lock by admins.

A swap (promote or rollback) loads and verifies the new version completely first, then replaces
the reference under a lock; a request reads the reference once and keeps that object to the
end, so requests in flight finish on the old model and none fails. The served version is the
registry ref ``served`` (refs.json); the history that rollback walks back is ``served.json``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedaiot.registry.files import replace
from fedaiot.registry.store import ModelRegistry
from fedaiot.serving.models import TORCH, LoadedModel, ModelLoadError, Runtime, load_model

log = logging.getLogger(__name__)
HISTORY_FILE = "served.json"


class ModelHolder:
    """The served model: read lock-free by requests, swapped atomically by admins."""

    def __init__(
        self,
        registry: ModelRegistry,
        public_key: Ed25519PublicKey,
        history_size: int = 20,
        runtime: Runtime = TORCH,
    ) -> None:
        self.registry = registry
        self.runtime = runtime
        self._key = public_key
        self._history_size = history_size
        self._swap = threading.Lock()
        self._current: LoadedModel | None = None

    def load(self, version: str) -> LoadedModel:
        """A verified, built version under this holder's runtime (not served by this call)."""
        return load_model(self.registry, version, self._key, self.runtime)

    @property
    def current(self) -> LoadedModel:
        model = self._current  # one read of the reference: the request keeps this object
        if model is None:
            raise RuntimeError("no model loaded")
        return model

    def start(self) -> LoadedModel:
        """Serve the ``served`` ref, else ``best``, else ``latest`` (else the newest version)."""
        refs = self.registry.refs()
        versions = self.registry.versions()
        version = refs.get("served") or refs.get("best") or refs.get("latest")
        if version is None:
            if not versions:
                raise ModelLoadError(f"no model version in the registry {self.registry.root}")
            version = versions[-1]
        with self._swap:
            model = self.load(version)
            history = self.history()
            if not history or history[-1] != version:
                history.append(version)
            self._record(history)
            self._current = model
        return model

    def promote(self, version: str) -> tuple[str, str]:
        """Serve ``version``; returns (previous, new). The old model stays on any refusal."""
        with self._swap:
            old = self.current
            if version == old.version:
                return old.version, version
            model = self.load(version)  # verified before the swap
            self._record([*self.history(), version])
            self._current = model
        return old.version, version

    def rollback(self) -> tuple[str, str]:
        """Serve the version served before the current one; returns (previous, new)."""
        with self._swap:
            old = self.current
            history = self.history()
            while history and history[-1] == old.version:
                history.pop()
            if not history:
                raise LookupError("no earlier served version to roll back to")
            model = self.load(history[-1])
            self._record(history)
            self._current = model
        return old.version, model.version

    def history(self) -> list[str]:
        path = self.registry.root / HISTORY_FILE
        try:
            data: Any = json.loads(path.read_text())
            history = data["history"]
            if isinstance(history, list) and all(isinstance(v, str) for v in history):
                return history
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError):
            pass
        log.warning("ignoring the unreadable served-version history %s", path)
        return []

    def _record(self, history: list[str]) -> None:
        history = history[-self._history_size :]
        self.registry.set_refs(served=history[-1])
        replace(
            self.registry.root / HISTORY_FILE, json.dumps({"history": history}, indent=2).encode()
        )
