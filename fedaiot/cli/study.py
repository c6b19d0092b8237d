"""``fedaiot study``: draft, check and write example data for a study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

study_app = typer.Typer(no_args_is_help=True, help="Study files: draft, check, example data.")


@study_app.command("init")
def study_init(
    csv: Annotated[Path, typer.Option(help="a table of this institution (CSV or Parquet)")],
    label: Annotated[str, typer.Option(help="the column the model predicts")],
    out: Annotated[Path, typer.Option(help="where to write the draft")] = Path("study.toml"),
    study_id: Annotated[str, typer.Option("--id", help="the study's id")] = "my-study",
    force: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """Draft a study file from a table: review it (ranges!) before sharing it."""
    from fedaiot.errors import BadInputError
    from fedaiot.studies.draft import draft_study

    if out.exists() and not force:
        raise BadInputError(f"{out} exists: choose another --out, or --force")
    out.write_text(draft_study(csv, label, study_id))
    print(f"drafted {out}: review every feature, and replace the ranges before sharing it")


@study_app.command("check")
def study_check(
    study: Annotated[Path, typer.Argument(help="the study file")],
    data: Annotated[Path | None, typer.Option(help="also check a table against it")] = None,
) -> None:
    """Check a study file (every problem named); with --data, a table against it."""
    from fedaiot.studies.encoding import Encoder
    from fedaiot.studies.spec import load_study
    from fedaiot.studies.table import read_table

    spec = load_study(study)
    width = len(Encoder.columns(spec))
    print(
        f"{study}: study {spec.key}, {len(spec.features)} features ({width} model inputs), "
        f"classes {spec.label.classes}, {spec.model.kind} model"
    )
    if data is not None:
        table = read_table(spec, data)
        held_out = int(table.test_rows().sum())
        ignored = f"; ignored columns: {', '.join(table.ignored)}" if table.ignored else ""
        print(
            f"{data}: {len(table)} examples {table.class_counts()}, {held_out} held out for "
            f"evaluation{ignored}"
        )


@study_app.command("demo-data")
def study_demo_data(
    name: Annotated[str, typer.Argument(help="pima-diabetes or pbc")],
    out: Annotated[Path, typer.Option(help="the CSV to write")],
    study: Annotated[Path, typer.Option(help="the study file (its columns are written)")],
    sites: Annotated[int, typer.Option(help="how many sites to deal the rows to")] = 1,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a real clinical table bundled by a Python package, with a random site column."""
    from fedaiot.studies.bundled import export
    from fedaiot.studies.spec import load_study

    spec = load_study(study)
    columns = [f.name for f in spec.features] + [spec.label.column]
    counts = export(name, out, columns=columns, sites=sites, seed=seed)
    print(f"{out}: {sum(counts.values())} rows, {counts}")


def register(app: typer.Typer) -> None:
    app.add_typer(study_app, name="study")
