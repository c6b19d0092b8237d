"""The ``fedaiot`` command."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedaiot.cli.audit import register as register_audit
from fedaiot.cli.deploy import register as register_deployment
from fedaiot.cli.serve import register as register_serving
from fedaiot.cli.sweep import register as register_sweep
from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.rounds.journal import jsonable

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
ledger_app = typer.Typer(no_args_is_help=True, help="Read and verify node privacy ledgers.")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect and verify a model registry.")
app.add_typer(ledger_app, name="ledger")
app.add_typer(registry_app, name="registry")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_NOTHING_LEARNED = 1, 2, 3, 4
_DEFAULT = RunConfig()  # the CLI's defaults are the run config's
err = Console(stderr=True)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def simulate(
    task: Annotated[
        str, typer.Option(help="breast-cancer, digits, fashion-mnist, ...")
    ] = _DEFAULT.task,
    nodes: Annotated[int, typer.Option(help="simulated institutions")] = 10,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = _DEFAULT.num_rounds,
    epsilon: Annotated[float, typer.Option(help="privacy budget per node")] = _DEFAULT.epsilon,
    delta: Annotated[float, typer.Option()] = _DEFAULT.delta,
    sample_rate: Annotated[
        float, typer.Option(help="DP-SGD's Poisson sampling rate, the same for every node")
    ] = _DEFAULT.sample_rate,
    seeded_noise: Annotated[
        bool,
        typer.Option(
            "--seeded-noise", help="research only: noise from --seed, reproducible, NOT private"
        ),
    ] = False,
    private: Annotated[bool, typer.Option("--dp/--no-dp", help="DP-SGD or plain SGD")] = True,
    partitioner: Annotated[
        str, typer.Option(help="iid, dirichlet or pathological")
    ] = _DEFAULT.partitioner,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration")
    ] = _DEFAULT.dirichlet_alpha,
    classes_per_node: Annotated[
        int, typer.Option(help="for pathological")
    ] = _DEFAULT.classes_per_node,
    strategy: Annotated[str, typer.Option(help="fedavg, fedprox or fedadam")] = _DEFAULT.strategy,
    local_epochs: Annotated[int, typer.Option()] = _DEFAULT.local_epochs,
    batch_size: Annotated[int, typer.Option()] = _DEFAULT.batch_size,
    lr: Annotated[float, typer.Option(help="local learning rate")] = _DEFAULT.learning_rate,
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
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="any run-config key, as key=value (repeatable)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary")] = False,
) -> None:
    """Train one model across simulated institutions with Flower's simulation engine."""
    output = output or Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if nodes < 1:
        raise fail(f"--nodes must be >= 1, got {nodes}")
    if secure_aggregation not in ("on", "off"):
        raise fail(f"--secure-aggregation must be on or off, got {secure_aggregation!r}")
    extra: dict[str, str] = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--set takes key=value, got {item!r}")
        extra[key.strip()] = value.strip()
    try:
        cfg = RunConfig.from_run_config(
            {
                "task": task,
                "num-rounds": rounds,
                "epsilon": epsilon,
                "delta": delta,
                "sample-rate": sample_rate,
                "seeded-noise": seeded_noise,
                "private": private,
                "partitioner": partitioner,
                "dirichlet-alpha": alpha,
                "classes-per-node": classes_per_node,
                "strategy": strategy,
                "local-epochs": local_epochs,
                "batch-size": batch_size,
                "learning-rate": lr,
                "max-grad-norm": max_grad_norm,
                "fraction-train": fraction,
                "seed": seed,
                "min-train-nodes": min(2, nodes),
                "min-available-nodes": nodes,
                "secure-aggregation": secure_aggregation == "on",
                "output-dir": str(output.resolve()),
                "stop-after-round": stop_after,
                **extra,
            }
        )
        from fedaiot.simulation.engine import preflight

        done = preflight(cfg, nodes)
    except (ConfigError, ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None

    from fedaiot.cli.display import RoundProgress, summary_tables
    from fedaiot.rounds.journal import Journal
    from fedaiot.simulation.engine import Outcome, SimulationError
    from fedaiot.simulation.engine import simulate as run_simulation

    console = Console(stderr=as_json)
    console.print(
        f"fedaiot: {cfg.task}, {nodes} nodes, {cfg.num_rounds} rounds, "
        + (f"epsilon {cfg.epsilon:g} per node" if cfg.private else "non-private")
        + f", {cfg.partitioner} partitions -> {cfg.output_path}",
        highlight=False,
    )
    if cfg.seeded_noise and cfg.private:
        from fedaiot.privacy.disclosure import NOT_PRIVATE

        console.print(f"[red]{NOT_PRIVATE}: results for research only[/]", highlight=False)
    finished = Journal(cfg.output_path).read_summary() if done >= cfg.num_rounds else None
    try:
        if finished is not None:  # nothing left to train: report the run as it ended
            console.print(f"run {cfg.output_path.name} already completed its {done} rounds")
            outcome = Outcome("completed", finished, "", 0.0, cfg.output_path / "flower.log")
        else:
            with RoundProgress(console, cfg.num_rounds) as progress:
                outcome = run_simulation(cfg, nodes, on_event=progress)
    except SimulationError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    summary: dict[str, Any] = {**outcome.summary, "wall_seconds": outcome.wall_seconds}
    summary["output_dir"] = str(cfg.output_path)
    if outcome.status == "failed":
        raise fail(f"the run failed: {outcome.error} (log: {outcome.log})", EXIT_FAILED)
    if outcome.status == "no-aggregate":
        raise fail(
            f"{summary.get('error', 'no round aggregated any update')}: no model was registered",
            EXIT_NOTHING_LEARNED,
        )
    if as_json:
        print(json.dumps(jsonable(summary), allow_nan=False))
    else:
        for table in summary_tables(summary):
            console.print(table)
    if outcome.status == "budget-exhausted":
        raise fail("every node refused to train: their privacy budgets are spent", EXIT_BUDGET)


@ledger_app.command("show")
def ledger_show(path: Path) -> None:
    """Print a node's privacy ledger: rounds, history and epsilon spent."""
    from fedaiot.privacy.ledger import LedgerError, summarize

    try:
        print(json.dumps(jsonable(summarize(path)), indent=2))
    except LedgerError as exc:
        raise fail(str(exc)) from None


@ledger_app.command("verify")
def ledger_verify(paths: list[Path]) -> None:
    """Recompute each ledger's epsilon independently and compare it with what it reported.

    The PLD accountant at a finer discretisation and Opacus' PRV accountant must both agree
    within 1 %; Opacus' RDP accountant, a looser bound, must not fall below it.
    """
    from fedaiot.privacy.accounting import (
        AGREEMENT,
        epsilon_pld_fine,
        epsilon_prv,
        epsilon_rdp,
        epsilon_spent,
    )
    from fedaiot.privacy.ledger import LedgerError, summarize

    problems = []
    for path in paths:
        try:
            ledger = summarize(path)
        except LedgerError as exc:
            raise fail(str(exc)) from None
        if not ledger["history"]:
            print(f"{path}: nothing spent")
            continue
        history, delta = ledger["history"], ledger["delta"]
        reported = epsilon_spent(history, delta)
        checks = {"pld-fine": epsilon_pld_fine(history, delta), "prv": epsilon_prv(history, delta)}
        rdp = epsilon_rdp(history, delta)
        gaps = {name: abs(value - reported) / reported for name, value in checks.items()}
        print(
            f"{path}: epsilon {reported:.4f} (pld) at delta {delta:g}; "
            + ", ".join(f"{n} {checks[n]:.4f} (gap {gaps[n]:.2e})" for n in checks)
            + f"; rdp bound {rdp:.4f}"
        )
        problems += [
            f"{path}: {n} differs by {g:.2%}" for n, g in gaps.items() if not g <= AGREEMENT
        ]
        if not rdp >= reported * (1 - AGREEMENT):
            problems.append(f"{path}: the RDP bound {rdp:.4f} is below the PLD's {reported:.4f}")
    if problems:
        raise fail("; ".join(problems), EXIT_FAILED)


@registry_app.command("list")
def registry_list(root: Path) -> None:
    """List a registry's versions with round, accuracy and refs."""
    from fedaiot.registry.store import ModelRegistry, RegistryError

    registry = ModelRegistry(root)
    try:
        refs = registry.refs()
        for version in registry.versions():
            manifest = registry.manifest(version)
            marks = ",".join(k for k, v in refs.items() if v == version)
            accuracy = manifest.metrics.get("accuracy", math.nan)
            print(f"{version}\tround {manifest.round}\taccuracy {accuracy:.4f}\t{marks}")
    except RegistryError as exc:
        raise fail(str(exc)) from None


@registry_app.command("verify")
def registry_verify(root: Path) -> None:
    """Check every version's weights against its manifest hash."""
    from fedaiot.registry.store import ModelRegistry, RegistryError

    registry = ModelRegistry(root)
    problems = 0
    for version in registry.versions():
        try:
            registry.load(version)
            print(f"ok\t{version}")
        except RegistryError as exc:
            problems += 1
            err.print(f"[red]bad[/]\t{exc}", highlight=False)
    if problems:
        raise typer.Exit(EXIT_FAILED)


register_serving(app)
register_audit(app)
register_deployment(app)
register_sweep(app)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that every started process is stopped on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
