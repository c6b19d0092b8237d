"""The coordinator's SuperLink: TLS, node authentication, a state database, and ``flwr`` calls.

Everything goes through Flower's public command lines (``flower-superlink`` and ``flwr`` with
``--format json``), against a connection named ``fedaiot`` in a private ``FLWR_HOME`` under
the coordinator's state folder.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import tomli_w

from fedaiot.deploy import provision
from fedaiot.launch.processes import DeployError, flower_env, spawn, stop_tree
from fedaiot.registry import signing

CONNECTION = "fedaiot"
UNFINISHED = ("pending", "starting", "running")


@dataclass(frozen=True)
class CoordinatorPaths:
    """Where the coordinator's kit reads its keys and keeps its state."""

    pki: Path
    state: Path

    @property
    def ca(self) -> Path:
        return self.pki / provision.CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.pki / provision.SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.pki / provision.SERVER_KEY

    @property
    def signing_key(self) -> Path:
        return self.pki / "coordinator" / signing.PRIVATE_KEY_FILE

    @property
    def public_key(self) -> Path:
        return self.pki / "coordinator" / signing.PUBLIC_KEY_FILE

    @property
    def flwr_home(self) -> Path:
        return self.state / "flower"

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def log(self) -> Path:
        return self.state / "superlink.log"

    @property
    def roster(self) -> Path:
        """Flower node id -> institution name: who is who, by the key each registered."""
        return self.state / "roster.json"

    def check(self) -> None:
        for path in (self.ca, self.server_cert, self.server_key, self.signing_key):
            if not path.is_file():
                raise DeployError(f"{path} not found: create it with `fedaiot provision`")
        for path in (self.server_key, self.signing_key):
            if path.stat().st_mode & 0o077:
                raise DeployError(f"{path} is readable by others: chmod 600 {path}")

    def env(self) -> dict[str, str]:
        # The ServerApp runs under the SuperLink and signs every registered version.
        return flower_env(self.flwr_home, **{signing.SIGNING_KEY_ENV: str(self.signing_key)})


def start_superlink(
    paths: CoordinatorPaths, host: str, port: int, log: IO[bytes], timeout: float = 90.0
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` (TLS, node authentication, SQLite state) and wait for it."""
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    command = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(paths.ca),
        "--ssl-certfile",
        str(paths.server_cert),
        "--ssl-keyfile",
        str(paths.server_key),
        "--enable-supernode-auth",
        "--database",
        str(paths.database),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    process = spawn(command, paths.env(), log)
    context = ssl.create_default_context(cafile=str(paths.ca))
    url = f"https://{_connect_host(host)}:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeployError(
                f"flower-superlink exited with code {process.returncode}: see {paths.log}"
            )
        try:
            if httpx.get(url, verify=context, timeout=1.0).is_success:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_tree(process)
    raise DeployError(f"flower-superlink did not answer on {url} within {timeout:.0f} s")


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host  # the CLI talks to it locally


def write_connection(paths: CoordinatorPaths, host: str, port: int) -> None:
    """The ``fedaiot`` connection of ``flwr`` commands: this SuperLink, over TLS."""
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": f"{_connect_host(host)}:{port}",
                "root-certificates": str(paths.ca.resolve()),
            },
        }
    }
    (paths.flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def flwr(paths: CoordinatorPaths, *args: str, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer (raise when it failed)."""
    command = ["flwr", *args, "--format", "json"]
    try:
        done = subprocess.run(
            command, env=paths.env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"`{' '.join(command)}` did not answer within {timeout:.0f} s") from None
    start = done.stdout.find("{")
    try:
        answer: dict[str, Any] = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DeployError(f"`{' '.join(command)}` failed: {detail[-1] if detail else 'no output'}")
    return answer


def register_nodes(paths: CoordinatorPaths, keys: dict[str, Path]) -> dict[str, str]:
    """Register each institution's public key (idempotent) and keep the roster of node ids
    the SuperLink assigned; returns what happened to each."""
    roster = read_roster(paths)
    outcome = {}
    for name, key in keys.items():
        answer = flwr(paths, "supernode", "register", str(key), CONNECTION, "--name", name)
        if answer.get("success"):
            roster[str(answer["node-id"])] = name
            outcome[name] = f"registered as node {answer.get('node-id')}"
        elif "already in use" in str(answer.get("error-message", "")):
            outcome[name] = "already registered"
        else:
            message = str(answer.get("error-message", "")).strip().splitlines()
            raise DeployError(f"registering {name} ({key}) failed: {message[-1:]}")
        if name not in roster.values():
            raise DeployError(
                f"{name} is registered but {paths.roster} does not name its node id: the "
                "roster was lost; start from a new --state folder"
            )
    names = list(roster.values())
    if len(set(names)) != len(names):
        raise DeployError(f"{paths.roster} names one institution twice: {sorted(names)}")
    tmp = paths.roster.with_suffix(".tmp")
    tmp.write_text(json.dumps(roster, indent=2, sort_keys=True))
    tmp.replace(paths.roster)
    return outcome


def read_roster(paths: CoordinatorPaths) -> dict[str, str]:
    if not paths.roster.exists():
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(paths.roster.read_text()).items()}
    except (ValueError, AttributeError) as exc:
        raise DeployError(f"{paths.roster} is unreadable: {exc}") from None


def runs(paths: CoordinatorPaths, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    answer = flwr(paths, *args)
    if not answer.get("success"):
        raise DeployError(f"listing runs failed: {answer.get('error-message', '')}")
    return list(answer.get("runs", []))


def stop_unfinished(paths: CoordinatorPaths) -> list[str]:
    """Stop runs a previous SuperLink life left unfinished: their ServerApp is gone, and a
    node must not train for a run nobody will aggregate (it would spend budget for nothing)."""
    stopped = []
    for run in runs(paths):
        if str(run.get("status", "")).split(":")[0] in UNFINISHED:
            flwr(paths, "stop", str(run["run-id"]), CONNECTION)
            stopped.append(str(run["run-id"]))
    return stopped


def submit(paths: CoordinatorPaths, project: Path, run_config: Path) -> int:
    answer = flwr(paths, "run", str(project), CONNECTION, "--run-config", str(run_config))
    if not answer.get("success"):
        raise DeployError(f"submitting the run failed: {answer.get('error-message', '')}")
    return int(answer["run-id"])


def run_status(paths: CoordinatorPaths, run_id: int) -> str:
    found = runs(paths, run_id)
    return str(found[0].get("status", "")) if found else "unknown"
