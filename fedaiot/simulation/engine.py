"""Run the project's Flower apps through Flower's simulation engine, as ``flwr run`` does.

``fedaiot simulate`` must exercise exactly what ``flwr run .`` exercises, so it drives the same
command line: it starts its own SuperLink (simulation mode, loopback, free ports, a private
``FLWR_HOME``) as a child it owns, submits the app with ``flwr run`` against it, follows the
coordinator's journal for progress, and stops everything it started. The outcome is read from
the journal, not from ``flwr run``'s exit code (which is 0 even for a failed run).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

import fedaiot
from fedaiot.config.run import RunConfig
from fedaiot.launch.processes import flower_env, free_port, stop_tree
from fedaiot.rounds.journal import Journal


class SimulationError(RuntimeError):
    """The simulation could not start, or ended without a result."""


@dataclass(frozen=True)
class Outcome:
    status: str  # the coordinator's status ("completed", "budget-exhausted") or "failed"
    summary: dict[str, Any]
    error: str
    wall_seconds: float
    log: Path


def project_dir() -> Path:
    """The folder whose pyproject.toml declares the Flower app (an editable install's root)."""
    root = Path(fedaiot.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists() or not (root / "server" / "server_app.py").exists():
        raise SimulationError(
            f"the Flower app is not found next to {root}: install fedaiot from its source "
            "checkout with `pip install -e .`"
        )
    return root


def preflight(cfg: RunConfig, nodes: int) -> int:
    """Refuse what would only fail later inside Flower, with the same clear message.

    Returns how many rounds of this run were already played (0 for a new run).
    """
    from fedaiot.node.round import simulated_federation
    from fedaiot.rounds.loop import rounds_done
    from fedaiot.secure_rounds.driver import MIN_NODES

    simulated_federation(cfg, nodes)
    per_round = max(int(nodes * cfg.fraction_train), cfg.min_train_nodes)
    if cfg.secure_aggregation and per_round < MIN_NODES:
        raise ValueError(
            f"secure aggregation needs at least {MIN_NODES} nodes per round, this run has "
            f"{per_round}: add nodes or use --secure-aggregation off"
        )
    out = cfg.output_path
    # what simulate() writes before the coordinator's journal: an attempt stopped that early
    started_only = {"flower", "flower.log"}
    if (
        out.exists()
        and not (out / "journal.jsonl").exists()
        and {entry.name for entry in out.iterdir()} - started_only
    ):
        raise ValueError(f"{out} exists and is not a fedaiot run folder")
    return rounds_done(cfg)


def simulate(
    cfg: RunConfig,
    num_nodes: int,
    *,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    node_cpus: int = 1,
) -> Outcome:
    out = cfg.output_path
    flwr_home = out / "flower"
    flwr_home.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port))
    overrides = flwr_home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(cfg.to_run_config()))
    connections = {"superlink": {"default": "local", "local": {"address": ":local:"}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connections))
    log = out / "flower.log"
    journal = Journal(out)
    _, offset = journal.events()  # follow only what this attempt adds
    started = time.perf_counter()
    with open(log, "ab") as log_file:
        superlink = _start_superlink(env, http_port, flwr_home, log_file)
        try:
            command = [
                "flwr",
                "run",
                str(project_dir()),
                "local",
                "--stream",
                "--run-config",
                str(overrides),
                "--federation-config",
                f"num-supernodes={num_nodes} client-resources-num-cpus={node_cpus}",
            ]
            runner = subprocess.Popen(
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                events = _follow(journal, offset, runner, on_event)
            finally:
                stop_tree(runner)
        finally:
            stop_tree(superlink)
    wall = time.perf_counter() - started
    failed = next((e for e in events if e["event"] == "failed"), None)
    end = next((e for e in events if e["event"] == "end"), None)
    if failed or end is None:
        error = failed["error"] if failed else f"the run ended without a result: see {log}"
        return Outcome("failed", journal.read_summary() or {}, error, wall, log)
    return Outcome(end["status"], journal.read_summary() or {}, "", wall, log)


def _start_superlink(
    env: dict[str, str], http_port: int, home: Path, log_file: Any
) -> subprocess.Popen[bytes]:
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--database",
        str(home / "state.db"),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:  # stopped on any way out, an interrupt while it starts included
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {process.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).is_success:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    except BaseException:
        stop_tree(process)
        raise
    stop_tree(process)
    raise SimulationError("flower-superlink did not become ready within 60 s")


def _follow(
    journal: Journal,
    offset: int,
    runner: subprocess.Popen[bytes],
    on_event: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while True:
        finished = runner.poll() is not None
        events, offset = journal.events(offset)
        for event in events:
            seen.append(event)
            on_event(event)
        if finished or any(e["event"] in ("end", "failed") for e in events):
            if not finished:
                runner.wait(timeout=60)
            return seen
        time.sleep(0.25)
