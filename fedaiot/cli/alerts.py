"""``fedaiot alerts validate``: check an alert rules file before a service uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

alerts_app = typer.Typer(no_args_is_help=True, help="Alert rules for the service.")


@alerts_app.command("validate")
def validate(rules: Annotated[Path, typer.Argument(help="the rules file (YAML)")]) -> None:
    """Validate a rules file: one line naming the rule and the field at fault, exit status 2."""
    from fedaiot.monitoring.rules import load_rules

    loaded = load_rules(rules)
    where = f", webhook {loaded.webhook.url}" if loaded.webhook else ", no webhook"
    print(
        f"{rules}: {len(loaded.rules)} rules, evaluated every {loaded.interval_seconds:g} s{where}"
    )
    for rule in loaded.rules:
        rollback = " (rolls back)" if getattr(rule, "rollback", False) else ""
        print(f"  {rule.name}: {rule.kind}, {rule.severity}{rollback}")


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
