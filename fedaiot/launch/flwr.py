"""The ``flwr`` command line: runs submitted and followed, and its JSON answers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import IO, Any

import fedaiot
from fedaiot.launch.processes import LaunchError, spawn


def project_dir() -> Path:
    """The folder whose pyproject.toml declares the Flower app (an editable install's root)."""
    root = Path(fedaiot.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists() or not (root / "server" / "server_app.py").exists():
        raise LaunchError(
            f"the Flower app is not found next to {root}: install fedaiot from its source "
            "checkout with `pip install -e .`"
        )
    return root


def flwr_json(args: list[str], env: dict[str, str], *, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer (raise when it gave none)."""
    command = ["flwr", *args, "--format", "json"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`{' '.join(command)}` did not answer within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise LaunchError("flwr not found: install fedaiot (it brings flwr)") from None
    start = done.stdout.find("{")
    try:
        answer: dict[str, Any] = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LaunchError(f"`{' '.join(command)}` failed: {detail[-1] if detail else 'no output'}")
    return answer


def stream_run(
    connection: str,
    run_config: Path,
    env: dict[str, str],
    log: IO[bytes],
    *,
    federation_config: str = "",
) -> subprocess.Popen[bytes]:
    """``flwr run`` of the project against ``connection``, streaming its logs until it ends."""
    command = ["flwr", "run", str(project_dir()), connection, "--stream"]
    command += ["--run-config", str(run_config)]
    if federation_config:
        command += ["--federation-config", federation_config]
    return spawn(command, env, log)
