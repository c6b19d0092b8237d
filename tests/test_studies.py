"""Studies: the study file, an institution's table against it (every bad input of the
walk-through refused before training), the encoding and its federated statistics, and the
evaluation counts the coordinator sums."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedaiot.node.study_round import StudyData, StudyMismatch, check_study
from fedaiot.studies.draft import draft_study
from fedaiot.studies.encoding import (
    Encoder,
    contributions,
    sensitivity,
    statistics_from_sums,
)
from fedaiot.studies.spec import StudyError, load_study, parse_study
from fedaiot.studies.table import read_table
from fedaiot.tasks.base import ArrayData
from fedaiot.tasks.evaluation import evaluate, evaluation_counts, metrics_from_counts

STUDY = """
[study]
id = "toy"
version = 2
[label]
column = "outcome"
classes = ["healthy", "ill"]
positive = "ill"
[[features]]
name = "glucose"
kind = "numeric"
unit = "mg/dL"
range = [20, 300]
[[features]]
name = "bp"
kind = "numeric"
range = [20, 140]
missing = "impute"
[[features]]
name = "sex"
kind = "categorical"
levels = ["f", "m"]
[[features]]
name = "smoker"
kind = "boolean"
missing = "impute"
[quality]
min_examples = 10
min_per_class = 3
max_examples = 60
"""
HEADER = "glucose,bp,sex,smoker,outcome,record_id"


def _rows(n: int = 30, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ill = i % 3 == 0
        glucose = rng.normal(160 if ill else 100, 15)
        bp = "NA" if i % 7 == 0 else f"{rng.normal(75, 8):.0f}"
        rows.append(
            f"{glucose:.1f},{bp},{'mf'[i % 2]},{'yes' if i % 4 == 0 else 'no'},"
            f"{'ill' if ill else 'healthy'},{i}"
        )
    return rows


def _set(row: str, column: int, value: str) -> str:
    cells = row.split(",")
    cells[column] = value
    return ",".join(cells)


def _write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def study():  # type: ignore[no-untyped-def]
    return parse_study(STUDY)


def test_the_bundled_studies_load_and_describe_their_inputs() -> None:
    root = Path(__file__).parent.parent / "simulations" / "studies"
    pima, pbc = load_study(root / "pima-diabetes.toml"), load_study(root / "pbc.toml")
    assert pima.key == "pima-diabetes@1" and pbc.key == "pbc@1"
    assert "sex=m" in Encoder.columns(pbc) and "chol missing" in Encoder.columns(pbc)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("range = [20, 300]", ""), "features[0] (glucose): Value error, a numeric feature needs"),
        (('positive = "ill"', 'positive = "sick"'), "positive 'sick' is not one of"),
        (('levels = ["f", "m"]', 'levels = ["f"]'), "at least two levels"),
        (("version = 2", "version = 0"), "study.version"),
        (('kind = "boolean"', 'kind = "text"'), "features[3] (smoker).kind"),
        (("[quality]", "[quality]\nmax_weight = 3"), "quality.max_weight: Extra inputs"),
    ],
)
def test_a_bad_study_file_names_every_field_at_fault(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(StudyError) as info:
        parse_study(STUDY.replace(*edit))
    assert message.replace("Value error, ", "") in str(info.value)


def test_a_table_is_read_against_its_study(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = read_table(study, _write(tmp_path / "site.csv", _rows()))
    assert len(table) == 30 and table.ignored == ["record_id"]
    assert table.class_counts() == {"healthy": 20, "ill": 10}
    assert np.isnan(table.columns["bp"]).sum() == 5  # imputed later
    assert set(table.columns["sex"]) == {0, 1} and set(table.columns["smoker"]) == {0.0, 1.0}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda rows: [r.replace(",ill,", ",healthy,") for r in rows], "one class only"),
        (lambda rows: rows * 3, "more than the 60 one node may carry"),
        (
            lambda rows: [r.replace(",ill,", ",1,").replace(",healthy,", ",0,") for r in rows],
            "holds 0/1, but the study's classes are ['healthy', 'ill']",
        ),
        (
            lambda rows: [_set(r, 2, "NA") if i == 3 else r for i, r in enumerate(rows)],
            "missing value at row 4, and the study refuses missing 'sex'",
        ),
        (
            lambda rows: ["999," + r.split(",", 1)[1] if i == 2 else r for i, r in enumerate(rows)],
            "row 3: 999 mg/dL is outside the study's range [20, 300] mg/dL",
        ),
        (lambda rows: [r.replace(",f,", ",x,", 1) for r in rows], "is not one of the levels"),
        (lambda rows: rows[:5], "5 examples, the study needs at least 10"),
    ],
)
def test_every_bad_input_of_the_walk_through_is_refused_before_training(
    study,
    tmp_path: Path,
    make,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.raises(StudyError) as info:
        read_table(study, _write(tmp_path / "site.csv", make(_rows())))
    assert message in str(info.value)
    assert str(info.value).count("\n") == 0  # one line


def test_a_semicolon_file_and_a_missing_column_are_named(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    semicolons = [r.replace(",", ";") for r in _rows()]
    with pytest.raises(StudyError, match="semicolon-delimited"):
        read_table(study, _write(tmp_path / "a.csv", semicolons, HEADER.replace(",", ";")))
    with pytest.raises(StudyError, match="missing column 'outcome'"):
        read_table(study, _write(tmp_path / "b.csv", _rows(), HEADER.replace("outcome", "y")))


def test_mapped_codings_are_accepted(tmp_path: Path) -> None:
    mapped = parse_study(
        STUDY.replace(
            'positive = "ill"', 'positive = "ill"\ncodings = { "0" = "healthy", "1" = "ill" }'
        )
    )
    rows = [r.replace(",ill,", ",1,").replace(",healthy,", ",0,") for r in _rows()]
    assert read_table(mapped, _write(tmp_path / "s.csv", rows)).class_counts()["ill"] == 10


def test_a_node_of_another_study_version_refuses_with_one_line(study) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StudyMismatch) as info:
        check_study(study, {"study-key": "toy@1"})
    assert str(info.value) == (
        "this node holds study toy@2, the coordinator runs toy@1: both sides must use the "
        "same study file"
    )
    check_study(study, {"study-key": "toy@2"})


def test_exact_sums_give_the_tables_statistics_and_noise_stays_within_bounds(
    study,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    table = read_table(study, _write(tmp_path / "s.csv", _rows(60)[:59] + _rows(1)))
    glucose = table.columns["glucose"]
    exact = statistics_from_sums(study, contributions(table))
    assert exact.features["glucose"].mean == pytest.approx(glucose.mean(), rel=1e-6)
    assert exact.features["glucose"].std == pytest.approx(glucose.std(), rel=1e-6)
    assert exact.features["sex"].frequencies == pytest.approx([0.5, 0.5], abs=0.02)
    rng = np.random.default_rng(1)
    for _ in range(50):  # noise far larger than the data: the study's prior decides, sanely
        noisy = contributions(table) + rng.normal(0, 500, size=contributions(table).shape)
        stats = statistics_from_sums(study, noisy, noise_std=500.0)
        g = stats.features["glucose"]
        assert 20 <= g.mean <= 300 and 0 < g.std < 300
        assert sum(stats.features["sex"].frequencies) == pytest.approx(1.0)
    assert sensitivity(study) == pytest.approx(np.sqrt(3 + 3 + 1 + 2))


def test_the_encoding_standardizes_and_marks_missing_values(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = read_table(study, _write(tmp_path / "s.csv", _rows()))
    encoder = Encoder(study, statistics_from_sums(study, contributions(table)))
    x = encoder.encode(table)
    columns = Encoder.columns(study)
    assert x.shape == (30, len(columns)) and x.dtype == np.float32
    assert columns == ["glucose", "bp", "bp missing", "sex=f", "sex=m", "smoker", "smoker missing"]
    assert abs(x[:, 0].mean()) < 1e-5 and x[:, 0].std() == pytest.approx(1.0, rel=1e-4)
    missing = np.isnan(table.columns["bp"])
    assert (x[missing, 1] == 0).all() and (x[missing, 2] == 1).all() and (x[~missing, 2] == 0).all()


def test_the_held_out_split_depends_on_each_record_alone(study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = read_table(study, _write(tmp_path / "a.csv", _rows(40)))
    more = read_table(study, _write(tmp_path / "b.csv", [*_rows(40), "150,80,m,no,ill,x"]))
    assert (more.test_rows()[:40] == table.test_rows()).all()
    split = StudyData.of(table)
    assert len(split.train) + len(split.test) == 40 and 0 < len(split.test) < 20
    tuning = StudyData.of(table, "validation")
    assert len(tuning.train) + len(tuning.test) == len(split.train)  # the test rows unused


def test_summed_counts_give_the_metrics_of_the_pooled_rows() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rng = np.random.default_rng(0)
    parts = [
        ArrayData(rng.normal(size=(50, 3)).astype(np.float32), rng.integers(0, 2, 50))
        for _ in range(3)
    ]
    counts = sum(evaluation_counts(model, p, positive_class=1) for p in parts)
    pooled = ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    exact = evaluate(model, pooled, positive_class=1)
    summed = metrics_from_counts(counts, 2)
    for key in ("accuracy", "sensitivity", "specificity"):
        assert summed[key] == pytest.approx(exact[key], abs=1e-6), key
    assert summed["auc"] == pytest.approx(exact["auc"], abs=0.05)  # 10 score bins
    assert summed["examples"] == 150
    noisy = metrics_from_counts(counts + rng.normal(0, 50, counts.shape), 2)
    assert all(np.isfinite(v) for v in noisy.values())


def test_a_draft_from_a_table_loads_and_infers_each_kind(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.csv", _rows())
    text = draft_study(path, "outcome", "drafted")
    draft = parse_study(text)
    kinds = {f.name: (f.kind, f.missing) for f in draft.features}
    assert kinds["glucose"] == ("numeric", "refuse")
    assert kinds["bp"] == ("numeric", "impute")
    assert kinds["sex"] == ("categorical", "refuse")
    assert kinds["smoker"][0] == "boolean"
    assert draft.label.classes == ["healthy", "ill"]
    assert "replace the ranges" in text
