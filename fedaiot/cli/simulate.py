"""``fedaiot simulate``: one run across simulated institutions, through Flower's engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from click.core import ParameterSource
from rich.console import Console

from fedaiot.config.run import MODE_DEFAULTS, RunConfig
from fedaiot.errors import (
    BadInputError,
    FlowerRuntimeError,
    NothingLearnedError,
    PrivacyBudgetError,
)

_DEFAULT = RunConfig()  # the CLI's defaults are the run config's

# Each option and the run-config key it sets (the options are shortcuts for --set).
KEYS = {
    "task": "task",
    "rounds": "num-rounds",
    "epsilon": "epsilon",
    "delta": "delta",
    "sample_rate": "sample-rate",
    "seeded_noise": "seeded-noise",
    "dp": "dp-mode",
    "dp_collusion": "dp-collusion",
    "partitioner": "partitioner",
    "alpha": "dirichlet-alpha",
    "classes_per_node": "classes-per-node",
    "strategy": "strategy",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "lr": "learning-rate",
    "max_grad_norm": "max-grad-norm",
    "fraction": "fraction-train",
    "seed": "seed",
    "secure_aggregation": "secure-aggregation",
    "stop_after": "stop-after-round",
    "study": "study",
    "data": "study-data",
    "site_column": "site-column",
}


def simulate(
    ctx: typer.Context,
    task: Annotated[
        str, typer.Option(help="breast-cancer, digits, fashion-mnist, ...")
    ] = _DEFAULT.task,
    nodes: Annotated[
        int | None, typer.Option(help="simulated institutions (a study: one per site)")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="federated rounds [default: 30; distributed: 90]")
    ] = None,
    epsilon: Annotated[float, typer.Option(help="privacy budget per node")] = _DEFAULT.epsilon,
    delta: Annotated[float, typer.Option()] = _DEFAULT.delta,
    sample_rate: Annotated[
        float | None,
        typer.Option(help="DP-SGD's Poisson sampling rate, the same for every node [0.2]"),
    ] = None,
    seeded_noise: Annotated[
        bool,
        typer.Option(
            "--seeded-noise", help="research only: noise from --seed, reproducible, NOT private"
        ),
    ] = False,
    dp: Annotated[
        str | None,
        typer.Option(
            "--dp",
            help="local: each node noises its own update; distributed: noise shares inside "
            "secure aggregation (central-DP accuracy, trusts that at most --dp-collusion nodes "
            "collude with the coordinator); off: no DP [default: distributed with secure "
            "aggregation, local without]",
        ),
    ] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="the same as --dp off")] = False,
    dp_collusion: Annotated[
        int, typer.Option(help="distributed DP: nodes assumed to collude with the coordinator")
    ] = _DEFAULT.dp_collusion,
    partitioner: Annotated[
        str, typer.Option(help="iid, dirichlet or pathological")
    ] = _DEFAULT.partitioner,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration")
    ] = _DEFAULT.dirichlet_alpha,
    classes_per_node: Annotated[
        int, typer.Option(help="for pathological")
    ] = _DEFAULT.classes_per_node,
    strategy: Annotated[
        str, typer.Option(help="fedavg, fedavgm (with --set server-momentum=M), fedprox, fedadam")
    ] = _DEFAULT.strategy,
    local_epochs: Annotated[int, typer.Option()] = _DEFAULT.local_epochs,
    batch_size: Annotated[int, typer.Option(help="batch size without DP")] = _DEFAULT.batch_size,
    lr: Annotated[
        float | None,
        typer.Option(help="local learning rate [0.2]; distributed: the coordinator's step [2.0]"),
    ] = None,
    max_grad_norm: Annotated[
        float, typer.Option(help="per-record clipping norm")
    ] = _DEFAULT.max_grad_norm,
    fraction: Annotated[
        float, typer.Option(help="fraction of nodes per round")
    ] = _DEFAULT.fraction_train,
    seed: Annotated[int, typer.Option()] = _DEFAULT.seed,
    secure_aggregation: Annotated[
        str, typer.Option(help="on: the coordinator sees only the sum (SecAgg+); off: plain")
    ] = "on",
    output: Annotated[Path | None, typer.Option(help="run folder (resumed if it exists)")] = None,
    stop_after: Annotated[int, typer.Option(help="pause after this round; rerun to go on")] = 0,
    study: Annotated[str, typer.Option(help="a study file (an institution's own table)")] = "",
    data: Annotated[str, typer.Option(help="a study's table of every site's rows")] = "",
    site_column: Annotated[str, typer.Option(help="the column naming each row's site")] = "",
    run_config: Annotated[
        Path | None, typer.Option(help="a TOML file of run-config keys; options given win")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="any run-config key, as key=value (repeatable; wins over all)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
) -> None:
    """Train one model across simulated institutions with Flower's simulation engine."""
    from fedaiot.simulation.engine import federation_size, preflight

    values = _values(ctx, output, run_config, settings or [])
    count = nodes if nodes is not None else federation_size(values)
    cfg = _run_config(values, count)
    done = preflight(cfg, count)
    summary = _run(cfg, count, done, as_json)
    if summary["status"] == "budget-exhausted":
        raise PrivacyBudgetError("every node refused to train: their privacy budgets are spent")


def _values(
    ctx: typer.Context, output: Path | None, file: Path | None, settings: list[str]
) -> dict[str, Any]:
    """Defaults < the run-config file < the options given on the command line < --set."""
    from fedaiot.config.run import read_run_config

    values: dict[str, Any] = read_run_config(file) if file else {}
    for option, key in KEYS.items():
        given = ctx.get_parameter_source(option) != ParameterSource.DEFAULT
        if ctx.params[option] is not None and (key not in values or given):
            values[key] = ctx.params[option]
    if ctx.params["no_dp"]:
        values["dp-mode"] = "off"
    secure = values["secure-aggregation"]
    if isinstance(secure, str):
        if secure not in ("on", "off"):
            raise BadInputError(f"--secure-aggregation must be on or off, got {secure!r}")
        values["secure-aggregation"] = secure == "on"
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--set takes key=value, got {item!r}")
        values[key.strip()] = value.strip()
    if "dp-mode" not in values:  # the main job's choice: see the README's Decisions
        values["dp-mode"] = "distributed" if _truthy(values["secure-aggregation"]) else "local"
    mode = str(values["dp-mode"]) if _truthy(values.get("private", True)) else "off"
    for key, default in MODE_DEFAULTS.get(mode, {}).items():
        values.setdefault(key, default)  # what the mode needs, where nothing else said
    name = Path(str(values["study"])).stem if values.get("study") else values["task"]
    stamped = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    values["output-dir"] = str(Path(output or values.get("output-dir") or stamped).resolve())
    return values


def _truthy(value: object) -> bool:
    return str(value).strip().lower() not in ("false", "0", "no", "off")


def _run_config(values: dict[str, Any], nodes: int) -> RunConfig:
    from fedaiot.config.run import node_counts

    fraction = float(values.get("fraction-train", _DEFAULT.fraction_train))
    return RunConfig.from_run_config({**node_counts(nodes, fraction), **values})


def _run(cfg: RunConfig, nodes: int, done: int, as_json: bool) -> dict[str, Any]:
    from fedaiot.cli.display import RoundProgress, summary_tables
    from fedaiot.rounds.journal import jsonable
    from fedaiot.simulation.engine import completed
    from fedaiot.simulation.engine import simulate as run_simulation

    console = Console(stderr=as_json)
    what = f"study {cfg.study}, one node per site" if cfg.study else cfg.task
    split = f"{cfg.partitioner} partitions" if not cfg.study else f"sites in {cfg.study_data}"
    console.print(
        f"fedaiot: {what}, {nodes} nodes, {cfg.num_rounds} rounds, "
        + (f"epsilon {cfg.epsilon:g} per node" if cfg.private else "non-private")
        + f", {split} -> {cfg.output_path}",
        highlight=False,
    )
    if cfg.dp_mode == "distributed":
        console.print(trust_assumption(cfg), highlight=False)
    if cfg.seeded_noise and cfg.private:
        from fedaiot.privacy.disclosure import NOT_PRIVATE

        console.print(f"[red]{NOT_PRIVATE}: results for research only[/]", highlight=False)
    finished = completed(cfg, done)
    if finished is not None:
        console.print(f"run {cfg.output_path.name} already completed its {done} rounds")
        outcome = finished
    else:
        with RoundProgress(console, cfg.num_rounds) as progress:
            outcome = run_simulation(cfg, nodes, on_event=progress)
    summary: dict[str, Any] = {**outcome.summary, "wall_seconds": outcome.wall_seconds}
    summary["output_dir"] = str(cfg.output_path)
    if cfg.study and outcome.status != "failed":
        from fedaiot.experiments.study_baselines import exact_metrics, pooled_baselines

        # the simulation holds every site's rows: no coordinator does (docs/studies.md)
        summary["exact"] = {**exact_metrics(cfg), **pooled_baselines(cfg)}
    if outcome.status == "failed":
        raise FlowerRuntimeError(f"the run failed: {outcome.error} (log: {outcome.log})")
    if outcome.status == "no-aggregate":
        error = summary.get("error", "no round aggregated any update")
        raise NothingLearnedError(f"{error}: no model was registered")
    if as_json:
        print(json.dumps(jsonable(summary), allow_nan=False))
    else:
        for table in summary_tables(summary):
            console.print(table)
    return summary


def trust_assumption(cfg: RunConfig) -> str:
    """The one line a distributed-DP run's operator must read before trusting its epsilon."""
    return (
        f"distributed DP: one DP-SGD step a round; each node adds a share of the noise inside "
        f"secure aggregation. Epsilon {cfg.epsilon:g} holds while at most {cfg.dp_collusion} "
        "node(s) collude with the coordinator and the others run fedaiot unmodified; each "
        "node's ledger also records its epsilon if all others colluded (epsilon-local)."
    )


def register(app: typer.Typer) -> None:
    app.command()(simulate)
