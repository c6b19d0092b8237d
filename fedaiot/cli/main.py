"""The ``fedaiot`` command."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from fedaiot.cli import (
    alerts,
    audit,
    campaign,
    deploy,
    export,
    ledger,
    serve,
    simulate,
    study,
    sweep,
)
from fedaiot.errors import FedaiotError
from fedaiot.launch.signals import interrupt_once


class _Commands(TyperGroup):
    """Every command's ``FedaiotError`` ends it with one line and that error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedaiotError as exc:
            Console(stderr=True).print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(exc.exit_code)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    pretty_exceptions_enable=False,
)
for group in (simulate, study, ledger, serve, export, alerts, audit, deploy, sweep, campaign):
    group.register(app)


def main() -> None:
    # SIGTERM stops a command as Ctrl-C does, so that every process it started is stopped on
    # the way out; a second signal does not cut that short
    interrupt_once(lambda signum: KeyboardInterrupt())
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
