"""``fedaiot coordinator campaign``: train again from the served model, register a candidate.

On demand by default; ``--every 7d`` runs one campaign after another on a schedule (each named
``<task>-c<k>``), where a failed campaign (nobody could train) is reported and the next one
still comes. The candidate is promoted by the service's gate or an admin, never here.
``--engine deployed`` trains on the institutions' own nodes through the coordinator's kit (the
options of ``fedaiot coordinator start``) and signs with the kit's key unless told otherwise.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedaiot.errors import BadInputError, FedaiotError
from fedaiot.registry.signing import SIGNING_KEY_ENV

# options that are shortcuts for run-config keys, as in ``fedaiot simulate``
KEYS = {
    "task": "task",
    "rounds": "num-rounds",
    "epsilon": "epsilon",
    "node_data": "node-data",
    "study": "study",
    "data": "study-data",
    "site_column": "site-column",
}


def campaign(
    registry: Annotated[Path, typer.Option(help="the service's model registry")],
    base: Annotated[
        str, typer.Option(help="served (default), a version's name, or fresh (a first campaign)")
    ] = "served",
    name: Annotated[str, typer.Option(help="the campaign's name [<task>-c<k>]")] = "",
    workdir: Annotated[
        Path | None,
        typer.Option("--dir", help="campaign runs and shared ledgers [<registry>/../campaigns]"),
    ] = None,
    nodes: Annotated[
        int | None, typer.Option(help="simulated nodes [one per node-data folder, or the base's]")
    ] = None,
    task: Annotated[str | None, typer.Option(help="a fresh campaign's task")] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds of this campaign")] = None,
    epsilon: Annotated[float | None, typer.Option(help="each node's lifetime budget")] = None,
    node_data: Annotated[
        Path | None, typer.Option(help="folder of node-<i>/data.csv|.npz files the nodes read")
    ] = None,
    study: Annotated[str | None, typer.Option(help="a fresh campaign's study file")] = None,
    data: Annotated[str | None, typer.Option(help="a study's table of every site's rows")] = None,
    site_column: Annotated[str | None, typer.Option(help="the column naming each site")] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", help="any run-config key, as key=value")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="flower (Flower's simulation engine), inprocess (no Ray), or deployed (the "
            "institutions' nodes, through the coordinator's kit)"
        ),
    ] = "flower",
    pki: Annotated[Path | None, typer.Option(help="deployed: the kit's pki folder")] = None,
    state: Annotated[Path | None, typer.Option(help="deployed: the kit's state folder")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="deployed: the app bundle the institutions approved")
    ] = None,
    approval: Annotated[
        list[Path] | None, typer.Option(help="deployed: an approval (a file or a folder of them)")
    ] = None,
    host: Annotated[str, typer.Option(help="deployed: the SuperLink's address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="deployed: the SuperLink's one port")] = 9093,
    signing_key: Annotated[
        Path | None, typer.Option(help=f"signs the candidate [${SIGNING_KEY_ENV}]")
    ] = None,
    audit_db: Annotated[
        Path | None, typer.Option(help="the service's audit log [<registry>/audit.sqlite3]")
    ] = None,
    every: Annotated[
        str, typer.Option(help="run on a schedule: seconds, or e.g. 30m, 12h, 7d")
    ] = "",
    times: Annotated[int, typer.Option(help="with --every: how many campaigns (0: no end)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON line per campaign")] = (
        False
    ),
) -> None:
    """Train a campaign from the served (or a named) version; register a candidate version."""
    from pydantic import ValidationError

    from fedaiot.campaigns.spec import CampaignSpec
    from fedaiot.config.run import ConfigError

    given = {"task": task, "rounds": rounds, "epsilon": epsilon, "node_data": node_data}
    given |= {"study": study, "data": data, "site_column": site_column}
    values: dict[str, Any] = {KEYS[k]: str(v) if isinstance(v, Path) else v
                              for k, v in given.items() if v is not None}  # fmt: skip
    values |= _settings(settings or [])
    kit = {"pki": pki, "state": state, "bundle": bundle, "approvals": approval}
    deployment = None
    if engine == "deployed":
        missing = [f"--{k.removesuffix('s')}" for k, v in kit.items() if not v]
        if missing:
            needed = ", ".join(missing)
            raise BadInputError(f"--engine deployed needs the coordinator's kit: {needed}")
        deployment = {**kit, "host": host, "port": port}
    elif any(kit.values()):
        raise BadInputError("--pki, --state, --bundle and --approval are for --engine deployed")
    try:
        spec = CampaignSpec(
            registry=registry, base=base, name=name, workdir=workdir, nodes=nodes,
            engine=engine, deployment=deployment, values=values,
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f" {first['loc'][0]}" if first["loc"] else ""
        why = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"campaign{where}: {why}") from None
    if signing_key is None and pki is not None and not os.environ.get(SIGNING_KEY_ENV):
        from fedaiot.deploy.superlink import CoordinatorPaths

        signing_key = CoordinatorPaths(pki, state or Path(".")).signing_key
    key = _signing_key(signing_key)
    if not every:
        _one(spec, key, audit_db, as_json)
        return
    if name:
        raise BadInputError("--name names one campaign: a schedule numbers its campaigns")
    from fedaiot.cli.serve import parse_ttl

    period, done = parse_ttl(every), 0
    while times == 0 or done < times:
        began = time.monotonic()
        try:
            _one(spec, key, audit_db, as_json)
        except FedaiotError as exc:  # the schedule goes on: new records may come
            Console(stderr=True).print(f"[red]campaign failed:[/] {exc}", highlight=False)
        done += 1
        if times == 0 or done < times:
            time.sleep(max(0.0, period - (time.monotonic() - began)))


def _one(spec: Any, key: Any, audit_db: Path | None, as_json: bool) -> None:
    from fedaiot.campaigns.run import describe, run_campaign
    from fedaiot.rounds.journal import jsonable

    console = Console(stderr=True)
    console.print(f"fedaiot campaign: from {spec.base} in {spec.registry}", highlight=False)
    result = run_campaign(spec, key, audit_db=audit_db)
    if as_json:
        print(json.dumps(jsonable(result.to_json()), allow_nan=False), flush=True)
        return
    console.print(describe(result), highlight=False)
    for view in result.nodes:
        spends = ", ".join(
            f"cohort {c['cohort'][:8]} ({c['records']} records) epsilon {c['epsilon']:.3f}"
            for c in view["cohorts"]
        )
        print(f"  {view['node']}: trained {view['trained']}, refused {view['refused']}; {spends}")


def _settings(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _signing_key(path: Path | None) -> Any:
    from fedaiot.registry.signing import load_private_key

    named = path or (Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None)
    if named is None:
        raise BadInputError(
            f"a candidate must be signed for the service to load it: --signing-key FILE or "
            f"${SIGNING_KEY_ENV}"
        )
    return load_private_key(named)


def register(app: typer.Typer) -> None:
    """Add ``campaign`` to ``fedaiot coordinator``."""
    from fedaiot.cli.deploy import coordinator_app

    coordinator_app.command("campaign")(campaign)  # in the coordinator's group, not app's
