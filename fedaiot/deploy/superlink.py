"""The coordinator's SuperLink: TLS, node authentication, a state database, and ``flwr`` calls.

Everything goes through Flower's public command lines (``flower-superlink`` and ``flwr`` with
``--format json``), against a connection named ``fedaiot`` in a private ``FLWR_HOME`` under
the coordinator's state folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedaiot.deploy import provision
from fedaiot.errors import BadInputError
from fedaiot.launch.flwr import flwr_json
from fedaiot.launch.processes import LaunchError, flower_env
from fedaiot.launch.superlink import SuperLink, Tls
from fedaiot.registry import signing

CONNECTION = "fedaiot"


class KitError(BadInputError):
    """A file, key, port or setting of a kit that cannot be used; the message says what to do."""


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
                raise KitError(f"{path} not found: create it with `fedaiot provision`")
        for path in (self.server_key, self.signing_key):
            if path.stat().st_mode & 0o077:
                raise KitError(f"{path} is readable by others: chmod 600 {path}")

    def env(self) -> dict[str, str]:
        # The ServerApp runs under the SuperLink and signs every registered version.
        return flower_env(self.flwr_home, **{signing.SIGNING_KEY_ENV: str(self.signing_key)})

    def superlink(self, host: str, port: int) -> SuperLink:
        """The coordinator's SuperLink: TLS, node authentication, SQLite state."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        tls = Tls(self.ca, self.server_cert, self.server_key)
        return SuperLink(port, self.database, host=host, tls=tls, node_auth=True)


def write_connection(paths: CoordinatorPaths, host: str, port: int) -> None:
    """The ``fedaiot`` connection of ``flwr`` commands: this SuperLink, over TLS."""
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": paths.superlink(host, port).local_address,
                "root-certificates": str(paths.ca.resolve()),
            },
        }
    }
    (paths.flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def flwr(paths: CoordinatorPaths, *args: str, timeout: float = 180.0) -> dict[str, Any]:
    """``flwr ARGS`` against this coordinator's SuperLink, its JSON answer."""
    return flwr_json(list(args), paths.env(), timeout=timeout)


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
            raise LaunchError(f"registering {name} ({key}) failed: {message[-1:]}")
        if name not in roster.values():
            raise KitError(
                f"{name} is registered but {paths.roster} does not name its node id: the "
                "roster was lost; start from a new --state folder"
            )
    names = list(roster.values())
    if len(set(names)) != len(names):
        raise KitError(f"{paths.roster} names one institution twice: {sorted(names)}")
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
        raise KitError(f"{paths.roster} is unreadable: {exc}") from None


def runs(paths: CoordinatorPaths, run_id: int | None = None) -> list[dict[str, Any]]:
    args = ["ls", CONNECTION] + (["--run-id", str(run_id)] if run_id is not None else [])
    answer = flwr(paths, *args)
    if not answer.get("success"):
        raise LaunchError(f"listing runs failed: {answer.get('error-message', '')}")
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


def submit(paths: CoordinatorPaths, app: str, run_config: Path) -> int:
    """Start a run of ``app``: a published app's ``@publisher/name==version`` (the SuperLink
    fetches it, signatures and all, from its app index) or a folder (unsigned)."""
    answer = flwr(paths, "run", app, CONNECTION, "--run-config", str(run_config))
    if not answer.get("success"):
        raise LaunchError(f"submitting the run failed: {answer.get('error-message', '')}")
    return int(answer["run-id"])


def run_status(paths: CoordinatorPaths, run_id: int) -> str:
    found = runs(paths, run_id)
    return str(found[0].get("status", "")) if found else "unknown"
