"""``fedaiot coordinator start``: SuperLink up, institutions registered, the run submitted.

One command does it all and follows the run through the coordinator's journal (``flwr run``
reports success even for a failed run). Stopping it (Ctrl-C, SIGTERM) stops the SuperLink and
the ServerApp. Starting it again resumes: the SuperLink reopens its state database, the
institutions stay registered, a run left unfinished by the previous life is stopped, and the
resubmitted run starts after the last round in the registry, so no finished round is lost.

The run is the app bundle the institutions approved, not the code in this checkout: the kit
serves the bundle and their signatures to its SuperLink (``deploy.app_index``) and submits it by
name, so every node receives it with the signatures its SuperNode checks.
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
from fedaiot.deploy.app_index import INDEX_ENV, serve_bundle
from fedaiot.deploy.bundle import Approval, Bundle
from fedaiot.deploy.institution_keys import REVIEW_PUB, review_key_id
from fedaiot.deploy.superlink import KitError
from fedaiot.launch.follow import Outcome, follow, outcome
from fedaiot.launch.processes import stop_tree
from fedaiot.launch.superlink import start_superlink
from fedaiot.rounds.journal import Journal

STATUS_EVERY = 30.0  # seconds between checks that the run is still alive in the SuperLink
SPARE_ROUNDS = 2  # a deployment's rounds of budget held back for rounds run again


def run_config(
    paths: superlink.CoordinatorPaths, overrides: Mapping[str, Any], institutions: int
) -> RunConfig:
    """The run's config: the file's values, with deployment defaults for what it leaves out.

    By default every registered institution must be online before a round starts and takes
    part in every round, the noise is planned with :data:`SPARE_ROUNDS` spare rounds (a round
    interrupted after the nodes' masked updates left is charged again when it is run again:
    each restart of the kit mid-round can cost one), and the registry and journal go under
    the state folder.
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
        "spare-rounds": SPARE_ROUNDS,
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


def check_approvals(
    paths: superlink.CoordinatorPaths, bundle: Bundle, approvals: list[Approval]
) -> list[str]:
    """What each institution's node will make of the bundle; KitError for an approval that
    does not verify, or one under an institution's name but not by its registered key."""
    if not approvals:
        raise KitError(f"no approval of {bundle.path.name}: every node would refuse to run it")
    by_id = {}
    for approval in approvals:
        if not approval.verifies(bundle.sha256):
            raise KitError(
                f"the approval by {approval.key_id} is not a valid signature of {bundle.path.name} "
                f"(SHA-256 {bundle.sha256[:16]}...): ask for it again"
            )
        by_id[approval.key_id] = approval
    notes = []
    for name in provision.registered_keys(paths.pki):
        registered = paths.pki / provision.INSTITUTIONS / name / REVIEW_PUB
        own = by_id.get(review_key_id(name))
        if own is None:
            notes.append(
                f"institution {name}: no approval of its own (its node runs the bundle only if "
                f"it trusts one of: {', '.join(sorted(by_id))})"
            )
        elif (
            not registered.exists()
            or registered.read_text().split()[:2] != own.public_key.split()[:2]
        ):
            raise KitError(
                f"the approval {own.key_id} is not signed by {name}'s registered review key"
            )
        else:
            notes.append(f"institution {name}: approved {bundle.spec}")
    return notes


def coordinate(
    paths: superlink.CoordinatorPaths,
    cfg: RunConfig,
    *,
    host: str,
    port: int,
    bundle: Bundle,
    approvals: list[Approval],
    say: Callable[[str], None] = print,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    polling: Polling | None = None,
) -> Outcome:
    """Start the SuperLink, register, submit the approved bundle, follow the run to its end,
    stop the SuperLink.

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
    with open(paths.log, "ab") as log, serve_bundle(bundle, approvals) as index:
        env = {**paths.env(), INDEX_ENV: index, "NO_PROXY": "127.0.0.1,localhost"}
        env.update((polling or Polling()).to_env())
        process = start_superlink(paths.superlink(host, port), env, log)
        try:
            say(f"SuperLink up on {host}:{port} (TLS, node authentication, {paths.database})")
            superlink.write_connection(paths, host, port)
            for name, what in superlink.register_nodes(paths, keys).items():
                say(f"institution {name}: {what}")
            for stale in superlink.stop_unfinished(paths):
                say(f"stopped run {stale}, left unfinished by the previous SuperLink")
            _, offset = journal.events()
            run_id = superlink.submit(paths, bundle.spec, overrides)
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


def run_deployed(
    pki: Path,
    state: Path,
    values: Mapping[str, Any],
    *,
    bundle: Path,
    approvals: list[Path],
    host: str,
    port: int,
    say: Callable[[str], None] = print,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    polling: Polling | None = None,
) -> Outcome:
    """A run of the run-config ``values`` on the kit's federation, as ``fedaiot coordinator
    start`` runs it: the deployment's defaults for what ``values`` leave out
    (:func:`run_config`), the bundle's approvals checked (each institution's verdict said), the
    port checked free, then :func:`coordinate`."""
    from fedaiot.deploy.bundle import Approval, read_bundle
    from fedaiot.launch.processes import port_free

    paths = superlink.CoordinatorPaths(pki.resolve(), state.resolve())
    paths.check()
    cfg = run_config(paths, values, len(provision.registered_keys(paths.pki)))
    if not port_free(host, port):
        raise KitError(f"port {port} on {host} is already in use")
    app = read_bundle(bundle)
    files = [f for a in approvals for f in (sorted(a.glob("*.json")) if a.is_dir() else [a])]
    loaded = [Approval.load(f) for f in files]
    for note in check_approvals(paths, app, loaded):
        say(note)
    return coordinate(
        paths, cfg, host=host, port=port, bundle=app, approvals=loaded, say=say,
        on_event=on_event, polling=polling,
    )  # fmt: skip
