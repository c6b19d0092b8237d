"""Helpers of the serving tests: a signed breast-cancer registry and a live uvicorn server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sklearn.datasets import load_breast_cancer

from fedaiot.registry.signing import generate_keypair, load_private_key
from fedaiot.registry.store import Manifest, ModelRegistry, NodePrivacy, version_name
from fedaiot.serving import ServingSettings, create_app
from fedaiot.serving.auth import issue_token
from fedaiot.serving.protocol import uvicorn_config
from fedaiot.tasks import get_task
from tests.waiting import answers, wait_until

TASK = get_task("breast-cancer")
DATA = np.asarray(load_breast_cancer().data, dtype=np.float64)
RUN = "bc"
V1, V2 = version_name(RUN, 1), version_name(RUN, 2)


@dataclass(frozen=True)
class Keys:
    private_path: Path
    public_path: Path
    private: Ed25519PrivateKey


def make_keys(directory: Path) -> Keys:
    private_path, public_path = generate_keypair(directory)
    return Keys(private_path, public_path, load_private_key(private_path))


def make_manifest(round_number: int, accuracy: float) -> Manifest:
    normalization = {"mean": DATA.mean(axis=0).tolist(), "std": DATA.std(axis=0).tolist()}
    return Manifest(
        version=version_name(RUN, round_number),
        run=RUN,
        task=TASK.name,
        architecture=TASK.architecture,
        input_schema=TASK.input_schema(normalization),
        round=round_number,
        metrics={"accuracy": accuracy, "loss": 0.2, "auc": 0.97},
        nodes=[
            NodePrivacy(
                id=f"node-{i}",
                examples=90,
                epsilon=0.5 * round_number,
                delta=1e-5,
                noise_multiplier=1.1,
                rounds=round_number,
            )
            for i in range(3)
        ],
        config={"task": TASK.name, "epsilon": 1.0, "num_rounds": 2},
        weights_sha256="",
        created=time.time(),
    )


def model_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TASK.build_model().state_dict()


def make_registry(root: Path, key: Ed25519PrivateKey | None) -> ModelRegistry:
    """Two signed versions of a breast-cancer model; ``best`` and ``latest`` are V2."""
    registry = ModelRegistry(root, signing_key=key)
    registry.register(model_state(1), make_manifest(1, 0.90))
    registry.register(model_state(2), make_manifest(2, 0.93))
    registry.set_refs(latest=V2, best=V2)
    return registry


def settings_for(registry: Path, keys: Keys, **overrides: Any) -> ServingSettings:
    return ServingSettings(registry=registry, public_key=keys.public_path, **overrides)


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


class LiveServer:
    """The app under a real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, settings: ServingSettings) -> None:
        self.app = create_app(settings)
        self.sock = bound_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn_config(self.app, settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(), "the test server to start"
        )
        if not self.server.started:
            raise RuntimeError("the test server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10.0)
        self.sock.close()


def token(keys: Keys, role: str, subject: str | None = None, ttl: float = 600, **kw: Any) -> str:
    return issue_token(
        keys.private, subject=subject or f"{role}-1", role=role, ttl_seconds=ttl, **kw
    )


def auth(keys: Keys, role: str, subject: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(keys, role, subject)}"}


def instance(shift: float = 0.0) -> list[float]:
    """One realistic row (the data set's first record), optionally shifted by ``shift``
    standard deviations of each feature (the service refuses inputs 100 away)."""
    return [float(v) for v in DATA[0] + shift * DATA.std(axis=0)]


class ServeProcess:
    """``fedaiot serve`` in a subprocess (its own interpreter: no GIL shared with the test)."""

    def __init__(self, registry: Path, keys: Keys, **settings: Any) -> None:
        env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
        for name, value in settings.items():
            text = json.dumps(value) if isinstance(value, dict | list) else str(value)
            env[f"FEDAIOT_SERVE_{name.upper()}"] = text
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "fedaiot", "serve", "--registry", str(registry)]
        command += ["--public-key", str(keys.public_path), "--port", str(self.port)]
        command += ["--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: answers(self.url + "/healthz"),
                "fedaiot serve to answer",
                process=self.process,
            )
        except AssertionError:
            raise RuntimeError(f"fedaiot serve did not start: {self.stop()[-2000:]}") from None

    def stop(self) -> str:
        """Stop the server; its stderr."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err or ""


def raw_exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send ``head`` and ``body`` on a fresh connection (a failed send is ignored: the server
    may close first) and return what the server answered: b"" for none before it closed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except OSError:
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    """The status code of a raw HTTP answer, None if there is none."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and answer.startswith(b"HTTP/1.") else None
