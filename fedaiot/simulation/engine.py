"""Run the project's Flower apps through Flower's simulation engine, as ``flwr run`` does.

``fedaiot simulate`` must exercise exactly what ``flwr run .`` exercises, so it drives the same
command line: through ``fedaiot.launch`` it starts its own SuperLink (simulation mode,
loopback, free ports, a private ``FLWR_HOME``), submits the app with ``flwr run`` against it,
follows the coordinator's journal for progress, and stops everything it started. The outcome
is read from the journal, not from ``flwr run``'s exit code (which is 0 even for a failed run).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.launch.flwr import stream_run
from fedaiot.launch.follow import Outcome, follow, outcome
from fedaiot.launch.processes import flower_env, free_port, stop_tree
from fedaiot.launch.superlink import SuperLink, start_superlink
from fedaiot.rounds.journal import Journal

DEFAULT_NODES = 10


def federation_size(values: Mapping[str, Any]) -> int:
    """How many nodes a simulation has when not told: a study's sites, else 10."""
    if values.get("study-data") and values.get("site-column"):
        from fedaiot.node.study_round import simulated_sites

        cfg = RunConfig.from_run_config({**values, "min-available-nodes": 1, "min-train-nodes": 1})
        return len(simulated_sites(cfg))
    return DEFAULT_NODES


def preflight(cfg: RunConfig, nodes: int) -> int:
    """Refuse what would only fail later inside Flower, with the same clear message.

    Returns how many rounds of this run were already played (0 for a new run).
    """
    from fedaiot.rounds.loop import rounds_done
    from fedaiot.secure_rounds.driver import MIN_NODES

    if cfg.study:
        _check_study_sites(cfg, nodes)
    else:
        from fedaiot.node.round import simulated_federation

        simulated_federation(cfg, nodes)
        if cfg.node_data:
            check_node_files(cfg, nodes)
    per_round = max(int(nodes * cfg.fraction_train), cfg.min_train_nodes)
    if cfg.secure_aggregation and per_round < MIN_NODES:
        raise BadInputError(
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
        raise BadInputError(f"{out} exists and is not a fedaiot run folder")
    return rounds_done(cfg)


def check_node_files(cfg: RunConfig, nodes: int) -> None:
    """Every simulated node's own file (``node-data``) read and checked before anything trains,
    with the message a deployed node would give."""
    from fedaiot.node.deployed import simulated_node_file
    from fedaiot.node.local_data import load_local
    from fedaiot.tasks import get_task

    task = get_task(cfg.task)
    for index in range(nodes):
        load_local(task, simulated_node_file(Path(cfg.node_data), index))


def _check_study_sites(cfg: RunConfig, nodes: int) -> None:
    """Every site's rows checked against the study before anything trains."""
    from fedaiot.node.study_round import simulated_sites, simulated_table
    from fedaiot.studies.spec import load_study

    study = load_study(Path(cfg.study))
    if not cfg.study_data:
        raise BadInputError("simulating a study needs its table: --data FILE --site-column COL")
    sites = simulated_sites(cfg)
    if len(sites) != nodes:
        raise BadInputError(
            f"{cfg.study_data} holds {len(sites)} sites in column {cfg.site_column!r}, the "
            f"simulation has {nodes} nodes: one node per site"
        )
    for index in range(len(sites)):
        simulated_table(cfg, study, index)  # StudyError names the site's file and fault


def completed(cfg: RunConfig, done: int) -> Outcome | None:
    """The outcome of a run that has played its ``done`` rounds, all of them (nothing left to
    train: rerunning it reports it as it ended, and starts no Flower process), or None."""
    journal = Journal(cfg.output_path)
    summary = journal.read_summary() if done >= cfg.num_rounds else None
    if summary is None:
        return None
    events, _ = journal.events()
    seconds = sum(float(e.get("seconds", 0.0)) for e in events if e["event"] == "round")
    status = str(summary.get("status", "completed"))
    return Outcome(status, summary, "", seconds, cfg.output_path / "flower.log")


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
    link = SuperLink(port=free_port(), database=flwr_home / "state.db", simulation=True)
    env = flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(link.port))
    overrides = flwr_home / "run-config.toml"
    overrides.write_text(tomli_w.dumps(cfg.to_run_config()))
    connections = {"superlink": {"default": "local", "local": {"address": ":local:"}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connections))
    log = out / "flower.log"
    journal = Journal(out)
    _, offset = journal.events()  # follow only what this attempt adds
    started = time.perf_counter()
    with open(log, "ab") as log_file:
        superlink = start_superlink(link, env, log_file, timeout=60.0)
        try:
            federation = f"num-supernodes={num_nodes} client-resources-num-cpus={node_cpus}"
            runner = stream_run("local", overrides, env, log_file, federation_config=federation)
            try:
                events = follow(journal, offset, on_event, runner=runner)
            finally:
                stop_tree(runner)
        finally:
            stop_tree(superlink)
    return outcome(events, journal, time.perf_counter() - started, log)
