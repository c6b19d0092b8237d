"""``fedaiot provision``, ``fedaiot coordinator ...`` and ``fedaiot node ...``: real deployment.

Bad input (a missing key, a data file off the task's schema, a port in use) is reported on one
line with exit status 2; a run or node that fails later exits with 1 (``fedaiot.errors``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedaiot.errors import BadInputError, FlowerRuntimeError

if TYPE_CHECKING:
    from fedaiot.config.polling import Polling

DEFAULT_PORT = 9093

coordinator_app = typer.Typer(no_args_is_help=True, help="The coordinator's kit (SuperLink).")
node_app = typer.Typer(no_args_is_help=True, help="The institution's kit (SuperNode).")

Pki = Annotated[Path, typer.Option(help="folder made by `fedaiot provision`")]
State = Annotated[Path, typer.Option(help="coordinator state: SuperLink database, runs, logs")]
Task = Annotated[str, typer.Option(help="the built-in task this node's data is for")]
StudyFile = Annotated[Path | None, typer.Option(help="the study file this node's table is for")]
PollInterval = Annotated[
    float | None,
    typer.Option(help="seconds between looks for work when idle (default 0.1; Flower: 3)"),
]
StockFlower = Annotated[
    bool, typer.Option(help="Flower's own waits and a process per message (slow; to compare)")
]


def _polling(interval: float | None, stock: bool) -> Polling:
    from fedaiot.config.polling import Polling, PollingError

    if stock:
        return Polling(mode="stock")
    if interval is None:
        return Polling()
    try:
        return Polling(fleet=interval)
    except ValueError as exc:
        raise PollingError(f"--poll-interval {interval}: must be between 0.01 and 60 s") from exc


def _task_or_study(task: str, study: Path | None) -> None:
    if bool(task) == (study is not None):
        raise BadInputError("name the data's --task or its --study (one of them)")


def provision(
    out: Annotated[Path, typer.Option(help="where to write keys and certificates")] = Path("pki"),
    approve: Annotated[
        list[Path], typer.Option(help="an institution's request.json (repeat for each)")
    ] = [],  # noqa: B006 - typer needs a literal default
    institution: Annotated[
        list[str], typer.Option(hidden=True, help="no longer made here: see `node init`")
    ] = [],  # noqa: B006
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="a name or IP the SuperLink is reached at (default 127.0.0.1, localhost)"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="replace existing keys and certificates")] = False,
) -> None:
    """Create the CA, the SuperLink's TLS certificate and the signing key; register the
    institutions whose requests you approve and write the federation roster."""
    from fedaiot.deploy.provision import provision as make
    from fedaiot.deploy.registration import roster_of

    if institution:
        raise BadInputError(
            "institutions make their own keys: each runs `fedaiot node init --name NAME` and "
            "sends its request.json, which you register with --approve"
        )
    from fedaiot.deploy.institution_keys import NodeRequest

    done = make(out, approve, hosts=host, force=force)
    for path in approve:  # the institution reads its own to the coordinator, out of band
        request = NodeRequest.load(path)
        print(f"approved {request.institution}: request fingerprint {request.fingerprint}")
    for path in done.created:
        secret = path.stat().st_mode & 0o077 == 0
        print(f"created {path}{'  (secret, 0600)' if secret else ''}")
    for path in done.kept:
        print(f"kept    {path}  (exists; --force replaces it)")
    roster = roster_of(out)
    if roster is not None:
        print(
            f"roster {out / 'roster.json'}: {roster.fingerprint} ({len(roster.keys)} institutions)"
        )
        print("send every institution roster.json and ca.crt; they compare the fingerprint")


coordinator_app.command("provision")(provision)  # the coordinator's kit has it all


@coordinator_app.command("start")
def coordinator_start(
    run_config: Annotated[Path, typer.Option(help="TOML file of run config keys (kebab-case)")],
    bundle: Annotated[Path, typer.Option(help="the app bundle the institutions approved")],
    approval: Annotated[
        list[Path], typer.Option(help="an approval of the bundle (a file or a folder of them)")
    ],
    pki: Pki = Path("pki"),
    state: State = Path("coordinator-state"),
    host: Annotated[str, typer.Option(help="address the SuperLink listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the SuperLink's one port (Fleet, Control)")] = (
        DEFAULT_PORT
    ),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
    stock_flower: StockFlower = False,
) -> None:
    """Start the SuperLink, register the institutions, run the approved bundle to its end."""
    from fedaiot.config.run import read_run_config
    from fedaiot.deploy.coordinator_kit import run_deployed
    from fedaiot.rounds.journal import jsonable

    values = read_run_config(run_config)
    rounds: dict[str, object] = {"planned": "?"}  # the coordinator's start event says

    def say(line: str) -> None:
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    def progress(event: dict[str, object]) -> None:
        if event["event"] == "start":
            rounds["planned"] = event.get("rounds", "?")
        if event["event"] == "round":
            metrics = event.get("metrics") or {}
            accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
            shown = f"{accuracy:.3f}" if isinstance(accuracy, float) else "-"
            took = event.get("seconds")
            pace = f", {took:.2f} s" if isinstance(took, float) else ""
            pace += f", {event['exchanges']} exchanges" if "exchanges" in event else ""
            say(f"round {event['round']}/{rounds['planned']}: accuracy {shown}{pace}")

    outcome = run_deployed(
        pki, state, values, bundle=bundle, approvals=approval, host=host, port=port, say=say,
        on_event=progress, polling=_polling(None, stock_flower),
    )  # fmt: skip
    summary = {**outcome.summary, "wall_seconds": outcome.wall_seconds}
    if outcome.status == "failed":
        raise FlowerRuntimeError(f"the run failed: {outcome.error} (log: {outcome.log})")
    if as_json:
        print(json.dumps(jsonable(summary), allow_nan=False))
    else:
        say(f"run {summary.get('run')}: {outcome.status}, model {summary.get('model_version')}")
        say(f"registry {summary.get('registry')}")


@coordinator_app.command("serve")
def coordinator_serve(
    run: Annotated[str, typer.Option(help="the run's name (its folder under <state>/runs)")],
    pki: Pki = Path("pki"),
    state: State = Path("coordinator-state"),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Serve the run's registry with the inference service (models verified with the key)."""
    from fedaiot.cli.serve import serve
    from fedaiot.deploy.superlink import CoordinatorPaths

    paths = CoordinatorPaths(pki.resolve(), state.resolve())
    registry = paths.state / "runs" / run / "registry"
    if not registry.is_dir():
        raise BadInputError(f"no registry at {registry}: run `fedaiot coordinator start` first")
    serve(registry=registry, public_key=paths.public_key, host=host, port=port)


@node_app.command("schema")
def node_schema(task: Task) -> None:
    """Print what the node's data must hold for TASK (columns, or sample shape, and classes)."""
    from fedaiot.node.local_data import schema_of
    from fedaiot.tasks import get_task

    print(schema_of(get_task(task)).model_dump_json(indent=2))


@node_app.command("check")
def node_check(
    data: Annotated[Path, typer.Option(help="the data file or folder")],
    task: Task = "",
    study: StudyFile = None,
) -> None:
    """Check the institution's data against the task's schema or the study, starting nothing."""
    from fedaiot.node.local_data import load_local
    from fedaiot.tasks import get_task

    _task_or_study(task, study)
    if study is not None:
        from fedaiot.studies.spec import load_study
        from fedaiot.studies.table import read_table

        table = read_table(load_study(study), data)
        held_out = int(table.test_rows().sum())
        ignored = f"; ignored columns: {', '.join(table.ignored)}" if table.ignored else ""
        print(
            f"{data}: {len(table)} examples fit study {table.study.key} {table.class_counts()}, "
            f"{held_out} held out for evaluation{ignored}"
        )
        return
    loaded = load_local(get_task(task), data)
    counts = {name: int((loaded.y == i).sum()) for i, name in enumerate(get_task(task).class_names)}
    print(f"{data}: {len(loaded)} examples fit task {task} ({counts})")


@node_app.command("demo-data")
def node_demo_data(
    task: Task,
    institution: Annotated[list[str], typer.Option(help="one file per institution (repeat)")],
    out: Annotated[Path, typer.Option(help="writes <out>/<institution>/data.csv (or .npz)")],
    seed: Annotated[int, typer.Option(help="the run config's seed")] = 42,
    partitioner: Annotated[str, typer.Option(help="the run config's partitioner")] = "dirichlet",
) -> None:
    """Write each institution a file of the task's bundled data (its simulated partition)."""
    from fedaiot.config.run import RunConfig
    from fedaiot.deploy.demo_data import export

    cfg = RunConfig.from_run_config({"task": task, "seed": seed, "partitioner": partitioner})
    for path in export(cfg, len(institution), out, institution):
        print(path)


@node_app.command("start")
def node_start(
    data: Annotated[Path, typer.Option(help="the institution's data file or folder")],
    kit: Annotated[Path, typer.Option(help="this institution's kit (`node init`, `node pin`)")],
    superlink: Annotated[str, typer.Option(help="the coordinator's SuperLink, host:port")] = (
        f"127.0.0.1:{DEFAULT_PORT}"
    ),
    name: Annotated[
        str | None, typer.Option(help="node name in its files (default: its roster name)")
    ] = None,
    ledger_dir: Annotated[
        Path | None, typer.Option(help="privacy ledger folder (default <data dir>/.fedaiot)")
    ] = None,
    max_epsilon: Annotated[
        float | None, typer.Option(help="this institution's own lifetime epsilon cap")
    ] = None,
    reply_every: Annotated[
        float | None,
        typer.Option(
            help="hold each reply to a multiple of this many seconds after its request, so "
            "the coordinator cannot time your training (keep it under its timeouts)"
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="local port of the node's app runtime")] = 9094,
    task: Task = "",
    study: StudyFile = None,
    poll_interval: PollInterval = None,
    stock_flower: StockFlower = False,
) -> None:
    """Check the data, then run a SuperNode until Ctrl-C (or until the SuperLink refuses it)."""
    from fedaiot.deploy import node_console
    from fedaiot.deploy.institution_keys import read_trusted
    from fedaiot.deploy.supernode import NodeKit, explain_exit, prepare, start_supernode
    from fedaiot.launch.supernode import wait_supernode
    from fedaiot.node.round_log import Follower, line, log_path

    _task_or_study(task, study)
    polling = _polling(poll_interval, stock_flower)
    node_kit = NodeKit(kit.resolve())
    if max_epsilon is not None and not max_epsilon > 0:
        raise BadInputError(f"--max-epsilon must be > 0, got {max_epsilon}")
    identity = node_kit.check()
    trusted = sorted(read_trusted(node_kit.folder))
    prepared = prepare(
        task=task,
        data=data,
        name=name or identity.name,
        ledger_dir=ledger_dir,
        max_epsilon=max_epsilon,
        study=study,
        kit=node_kit,
        reply_every=reply_every,
    )
    log = prepared.settings.ledger_dir / f"supernode-{prepared.settings.node_name}.log"
    offset = log.stat().st_size if log.exists() else 0
    rounds = Follower(log_path(prepared.settings))
    processes = start_supernode(node_kit, prepared, superlink, port, log, polling)
    settings = prepared.settings
    for note in processes.notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    runtime = "Flower's own" if processes.runner is None else "the kit's warm"
    print(
        f"node {settings.node_name}: {prepared.examples} examples of {settings.task} from "
        f"{settings.data_path}, ledgers in {settings.ledger_dir}, SuperLink {superlink}, "
        f"{runtime} ClientApp runtime (log {log})",
        flush=True,
    )
    print(
        f"node {settings.node_name}: {identity.name} in roster {identity.roster.fingerprint}; "
        f"runs app bundles signed by {', '.join(trusted)} only",
        flush=True,
    )
    if settings.reply_every is not None:
        print(
            f"node {settings.node_name}: replies held to multiples of {settings.reply_every:g} s "
            "after each request",
            flush=True,
        )

    def show_rounds() -> None:
        for event in rounds.new_events():
            print(line(event), flush=True)

    stop_watching = node_console.watch(log, offset, trusted, lambda s: print(s, flush=True))
    try:
        code = wait_supernode(processes, on_tick=show_rounds)
    finally:
        stop_watching()
    if code not in (0, -15, 143):
        raise FlowerRuntimeError(explain_exit(code, log, offset))


def register(app: typer.Typer) -> None:
    """Add ``provision``, ``coordinator`` and ``node`` to the ``fedaiot`` command."""
    from fedaiot.cli import trust

    trust.register(node_app, coordinator_app)
    app.command("provision")(provision)
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(node_app, name="node")
