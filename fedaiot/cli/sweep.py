"""``fedaiot sweep`` and ``fedaiot report``: the researcher's experiments and their report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedaiot.errors import FedaiotError


def default_spec() -> Path:
    from fedaiot.launch.flwr import project_dir

    return project_dir() / "simulations" / "sweeps" / "small.toml"


def sweep(
    spec_file: Annotated[
        Path | None,
        typer.Argument(help="sweep TOML (default: simulations/sweeps/small.toml)"),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="results folder (default: runs/sweep-<name>); rerun to resume"),
    ] = None,
    retry_failed: Annotated[bool, typer.Option(help="run failed points again")] = False,
    membership: Annotated[
        bool, typer.Option("--membership/--no-membership", help="attack every final model")
    ] = True,
    report: Annotated[bool, typer.Option("--report/--no-report")] = True,
) -> None:
    """Run a grid of simulations and baselines; write tidy results and the report."""
    from fedaiot.experiments.report import build_report
    from fedaiot.experiments.runner import run_sweep
    from fedaiot.experiments.spec import load_spec

    spec = load_spec(spec_file or default_spec())
    folder = (output or Path("runs") / f"sweep-{spec.name}").resolve()
    console = Console(stderr=True)
    console.print(f"fedaiot sweep {spec.name} -> {folder}", highlight=False)
    outcome = run_sweep(
        spec,
        folder,
        console=console,
        retry_failed=retry_failed,
        membership=spec.membership and membership,
    )
    console.print(
        f"{outcome.points} points: {outcome.skipped} already recorded, {outcome.ran} run, "
        f"{outcome.failed} failed; results in {folder / 'results.csv'}",
        highlight=False,
    )
    if report:
        console.print(f"report: {build_report(folder)}", highlight=False)
    if outcome.failed:
        raise FedaiotError(f"{outcome.failed} of {outcome.points} points failed: see results.csv")


def report(
    folder: Annotated[Path, typer.Argument(help="a sweep's results folder")],
) -> None:
    """Build report.md and its plots from a sweep's results files."""
    from fedaiot.experiments.report import build_report

    print(build_report(folder))


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("report")(report)
