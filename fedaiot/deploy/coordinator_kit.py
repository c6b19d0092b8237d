"""``fedaiot coordinator start``: SuperLink up, institutions registered, the run submitted.

One command does it all and follows the run through the coordinator's journal (``flwr run``
reports success even for a failed run). Stopping it (Ctrl-C, SIGTERM) stops the SuperLink and
the ServerApp. Starting it again resumes: the SuperLink reopens its state database, the
institutions stay registered, a run left unfinished by the previous life is stopped, and the
resubmitted run starts after the last round in the registry, so no finished round is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedaiot.config.polling import Polling
from fedaiot.config.run import RunConfig, node_counts
from fedaiot.deploy import provision, superlink
from fedaiot.deploy.superlink import KitError
from fedaiot.launch.flwr import project_dir
from fedaiot.launch.follow import Outcome, follow, outcome
from fedaiot.launch.processes import stop_tree
from fedaiot.launch.superlink import start_superlink
from fedaiot.rounds.journal import Journal

STATUS_EVERY = 30.0  # seconds between checks that the run is still alive in the SuperLink


def run_config(
    paths: superlink.CoordinatorPaths, overrides: Mapping[str, Any], institutions: int
) -> RunConfig:
    """The run's config: the file's values, with deployment defaults for what it leaves out.

    By default every registered institution must be online before a round starts and takes
    part in every round; the registry and journal go under the state folder.
    """
    study = str(overrides.get("study") or "")
    if study:  # the ServerApp runs elsewhere (under the SuperLink): give it an absolute path
        from fedaiot.studies.spec import load_study

        overrides = {**overrides, "study": str(Path(study).expanduser().resolve())}
        name = load_study(Path(overrides["study"])).id
    else:
        name = str(overrides.get("task", "run"))
    values: dict[str, Any] = {
        **node_counts(institutions, float(overrides.get("fraction-train", 1.0))),
        "output-dir": str((paths.state / "runs" / name).resolve()),
        **overrides,
    }
    cfg = RunConfig.from_run_config(values)
    if not Path(cfg.output_dir).is_absolute():  # relative to the state folder, not to $HOME
        cfg = cfg.model_copy(update={"output_dir": str((paths.state / cfg.output_dir).resolve())})
    from fedaiot.secure_rounds.driver import MIN_NODES

    if cfg.secure_aggregation and cfg.min_train_nodes < MIN_NODES:
        raise KitError(
            f"secure aggregation needs at least {MIN_NODES} nodes per round, min-train-nodes is "
            f"{cfg.min_train_nodes}: register more institutions or set secure-aggregation=false"
        )
    if cfg.min_available_nodes > institutions:
        raise KitError(
            f"min-available-nodes is {cfg.min_available_nodes}, only {institutions} "
            "institutions are provisioned: the run would wait forever"
        )
    return cfg


def coordinate(
    paths: superlink.CoordinatorPaths,
    cfg: RunConfig,
    *,
    host: str,
    port: int,
    say: Callable[[str], None] = print,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    polling: Polling | None = None,
) -> Outcome:
    """Start the SuperLink, register, submit, follow the run to its end, stop the SuperLink.

    ``polling`` reaches the ServerApp through the SuperLink's environment: its reply loop and
    object pulls, and the SuperLink's SuperExec that starts it (stock: Flower's own waits)."""
    from fedaiot.rounds.loop import rounds_done

    paths.check()
    keys = provision.registered_keys(paths.pki)
    if not keys:
        raise KitError(f"no institution keys in {paths.pki / provision.INSTITUTIONS}")
    done = rounds_done(cfg)
    journal = Journal(cfg.output_path)
    if done >= cfg.num_rounds and (summary := journal.read_summary()):
        say(f"run {cfg.output_path.name} already completed its {done} rounds")
        return Outcome("completed", summary, "", 0.0, paths.log)
    paths.state.mkdir(parents=True, exist_ok=True)
    overrides = paths.state / "run-config.toml"
    # the ServerApp names each institution from the key the SuperLink authenticated
    cfg = cfg.model_copy(update={"node_roster": str(paths.roster.resolve())})
    overrides.write_text(tomli_w.dumps(cfg.to_run_config()))
    started = time.perf_counter()
    with open(paths.log, "ab") as log:
        env = {**paths.env(), **(polling or Polling()).to_env()}
        process = start_superlink(paths.superlink(host, port), env, log)
        try:
            say(f"SuperLink up on {host}:{port} (TLS, node authentication, {paths.database})")
            superlink.write_connection(paths, host, port)
            for name, what in superlink.register_nodes(paths, keys).items():
                say(f"institution {name}: {what}")
            for stale in superlink.stop_unfinished(paths):
                say(f"stopped run {stale}, left unfinished by the previous SuperLink")
            _, offset = journal.events()
            run_id = superlink.submit(paths, project_dir(), overrides)
            say(f"submitted run {run_id}: {cfg.task}, rounds {done + 1}..{cfg.num_rounds}")

            def finished() -> str:
                status = superlink.run_status(paths, run_id)
                return status if status.startswith("finished") else ""

            events = follow(
                journal,
                offset,
                on_event,
                superlink=process,
                finished=finished,
                check_every=STATUS_EVERY,
            )
        finally:
            stop_tree(process)
    return outcome(events, journal, time.perf_counter() - started, paths.log)
