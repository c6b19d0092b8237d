"""``fedaiot ledger`` (a data set's privacy spent) and ``fedaiot registry`` (model versions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console

from fedaiot.errors import FedaiotError

ledger_app = typer.Typer(no_args_is_help=True, help="Read and verify node privacy ledgers.")
registry_app = typer.Typer(no_args_is_help=True, help="Inspect and verify a model registry.")


@ledger_app.command("show")
def ledger_show(path: Path) -> None:
    """Print a data set's privacy ledger (a ledger file): rounds, history and epsilon spent;
    or, for a node's ledger folder, each cohort of its records and what it has spent."""
    from fedaiot.privacy.cohorts import INDEX_FILE, cohort_spends
    from fedaiot.privacy.ledger import summarize
    from fedaiot.rounds.journal import jsonable

    if path.is_dir():
        if not (path / INDEX_FILE).exists():
            raise FedaiotError(f"{path} is not a node's ledger folder (no {INDEX_FILE})")
        print(json.dumps(jsonable({"folder": str(path), "cohorts": cohort_spends(path)}), indent=2))
        return
    print(json.dumps(jsonable(summarize(path)), indent=2))


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
    from fedaiot.privacy.ledger import summarize

    problems = []
    for path in paths:
        ledger = summarize(path)
        sides = {"training": ledger["history"], "test split": ledger["test_history"]}
        if ledger["skellam_history"]:  # the training side is checked with its Skellam steps
            sides["training (local rounds only)"] = sides.pop("training")
        if not any(sides.values()) and not ledger["skellam_history"]:
            print(f"{path}: nothing spent")
            continue
        delta = ledger["delta"]
        for side, history in sides.items():
            if not history:
                continue
            reported = epsilon_spent(history, delta)
            checks = {
                "pld-fine": epsilon_pld_fine(history, delta),
                "prv": epsilon_prv(history, delta),
            }
            rdp = epsilon_rdp(history, delta)
            gaps = {name: abs(value - reported) / reported for name, value in checks.items()}
            print(
                f"{path} ({side}): epsilon {reported:.4f} (pld) at delta {delta:g}; "
                + ", ".join(f"{n} {checks[n]:.4f} (gap {gaps[n]:.2e})" for n in checks)
                + f"; rdp bound {rdp:.4f}"
            )
            problems += [
                f"{path} ({side}): {n} differs by {g:.2%}" for n, g in gaps.items() if g > AGREEMENT
            ]
            if not rdp >= reported * (1 - AGREEMENT):
                problems.append(f"{path} ({side}): the RDP bound is below the PLD's")
        if ledger["skellam_history"]:
            problems += _verify_distributed(path, ledger, delta)
    if problems:
        raise FedaiotError("; ".join(problems))


def _verify_distributed(path: Path, ledger: dict[str, object], delta: float) -> list[str]:
    """Both epsilons of a data set that took part in distributed rounds, recomputed with
    dp-accounting's own Rényi-DP accountant: they must agree within 1 %."""
    from fedaiot.privacy.accounting import AGREEMENT, epsilon_rdp_independent
    from fedaiot.privacy.rdp import ORDERS, epsilon_composed

    problems = []
    gaussian = ledger["history"]
    for name, key in (("distributed", "skellam_history"), ("local", "share_history")):
        reported = epsilon_composed(gaussian, ledger[key], delta)  # type: ignore[arg-type]
        again = epsilon_rdp_independent(gaussian, ledger[key], delta, ORDERS)  # type: ignore[arg-type]
        gap = abs(again - reported) / reported
        print(
            f"{path} ({name} epsilon): {reported:.4f} (skellam rdp) at delta {delta:g}; "
            f"dp-accounting rdp {again:.4f} (gap {gap:.2e})"
        )
        if not gap <= AGREEMENT:
            problems.append(f"{path} ({name} epsilon): dp-accounting differs by {gap:.2%}")
    return problems


@registry_app.command("list")
def registry_list(root: Path) -> None:
    """List a registry's versions with round, accuracy and refs."""
    from fedaiot.registry.store import ModelRegistry

    registry = ModelRegistry(root)
    refs = registry.refs()
    for version in registry.versions():
        manifest = registry.manifest(version)
        marks = ",".join(k for k, v in refs.items() if v == version)
        accuracy = manifest.metrics.get("accuracy", math.nan)
        print(f"{version}\tround {manifest.round}\taccuracy {accuracy:.4f}\t{marks}")


@registry_app.command("verify")
def registry_verify(root: Path) -> None:
    """Check every version's weights against its manifest hash."""
    from fedaiot.registry.store import ModelRegistry, RegistryError

    registry = ModelRegistry(root)
    problems = []
    for version in registry.versions():
        try:
            registry.load(version)
            print(f"ok\t{version}")
        except RegistryError as exc:  # every version is checked, then the failure is reported
            problems.append(version)
            Console(stderr=True).print(f"[red]bad[/]\t{exc}", highlight=False)
    if problems:
        raise FedaiotError(f"{len(problems)} of the versions failed their checks")


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
    app.add_typer(registry_app, name="registry")
