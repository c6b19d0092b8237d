"""The sweep's dp-mode axis: local and distributed points, their results, and the report."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest

from fedaiot.experiments.report import build_report
from fedaiot.experiments.results import RESULT_COLUMNS, ResultsStore
from fedaiot.experiments.runner import Measured, describe, plan, run_sweep
from fedaiot.experiments.spec import Point, SweepError, expand, load_spec
from fedaiot.experiments.tables import gap_table, load, membership_table, utility_table
from tests.test_sweep import _fake, _spec

DISTRIBUTED = {
    "secure_aggregation": [True],
    "dp_modes": ["local", "distributed"],
    "run_config": {"breast-cancer": {"learning-rate": 0.2, "sample-rate": 0.2}},
    "distributed": {"breast-cancer": {"num-rounds": 6, "learning-rate": 1.0}},
}


def test_private_federated_points_are_run_in_each_dp_mode() -> None:
    points = expand(_spec(seeds=[1, 2], **DISTRIBUTED))
    by = {(p.kind, p.dp_mode, p.private) for p in points}
    assert by == {
        ("central", "local", True),
        ("central", "local", False),
        ("federated", "local", True),
        ("federated", "local", False),  # non-private: measured once, not once per mode
        ("federated", "distributed", True),
    }
    assert len(points) == 4 + 4 + 2 == len({p.id for p in points})
    local, distributed = (
        next(p for p in points if p.kind == "federated" and p.private and p.dp_mode == mode)
        for mode in ("local", "distributed")
    )
    assert (local.rounds, distributed.rounds) == (2, 6)
    # [distributed.<task>] on top of [run_config.<task>], num-rounds taken out as the rounds
    assert distributed.overrides == {"learning-rate": 1.0, "sample-rate": 0.2}
    cfg = distributed.run_config(Path("/x"))
    assert (cfg.dp_mode, cfg.num_rounds, cfg.learning_rate, cfg.sample_rate) == (
        "distributed",
        6,
        1.0,
        0.2,
    )
    assert local.run_config(Path("/x")).dp_mode == "local"
    baseline = next(p for p in points if p.kind == "federated" and not p.private)
    assert baseline.run_config(Path("/x")).dp_mode == "off"
    assert "distributed DP" in describe(distributed) and "local DP" in describe(local)
    assert plan(points) == "10 points: 4 central, 2 local DP, 2 non-private, 2 distributed DP"


def test_local_point_ids_are_those_recorded_before_the_dp_modes_axis() -> None:
    # computed with the code before Point had dp_mode: recorded sweeps must resume, not rerun
    local = Point(
        kind="federated",
        task="digits",
        epsilon=1.0,
        seed=1,
        nodes=10,
        partition="dirichlet-0.5",
        secure_aggregation=True,
        rounds=30,
        overrides={"learning-rate": 0.2, "sample-rate": 0.2},
    )
    assert local.id == "f2dc30b339ba"
    baseline = Point(
        kind="federated",
        task="breast-cancer",
        epsilon=math.inf,
        seed=1,
        nodes=3,
        partition="iid",
        secure_aggregation=False,
        rounds=2,
    )
    assert baseline.id == "6616598670d8"
    assert local.model_copy(update={"dp_mode": "distributed"}).id != local.id
    spec = load_spec(Path(__file__).parents[1] / "simulations" / "sweeps" / "distributed.toml")
    assert "f2dc30b339ba" in {p.id for p in expand(spec)}


def test_distributed_points_need_secure_aggregation(tmp_path: Path) -> None:
    mixed = expand(_spec(**{**DISTRIBUTED, "secure_aggregation": [True, False]}))
    distributed = [p for p in mixed if p.dp_mode == "distributed"]
    assert distributed and all(p.secure_aggregation for p in distributed)
    assert any(p.dp_mode == "local" and not p.secure_aggregation for p in mixed)

    bad = tmp_path / "bad.toml"
    bad.write_text('dp_modes = ["distributed"]\nsecure_aggregation = [false]\n')
    with pytest.raises(SweepError, match="distributed but secure_aggregation has no true"):
        load_spec(bad)
    bad.write_text('[run_config.digits]\ndp-mode = "distributed"\n')
    with pytest.raises(SweepError, match="dp-mode is set by the sweep"):
        load_spec(bad)
    bad.write_text('dp_modes = ["local", "distributed"]\n[distributed.digit]\nseed = 1\n')
    with pytest.raises(SweepError, match=r"\[distributed.digit\] names a task not in tasks"):
        load_spec(bad)
    bad.write_text("[distributed.digits]\nnum-rounds = 0\n")
    with pytest.raises(SweepError, match="num-rounds must be a whole number"):
        load_spec(bad)
    bad.write_text('dp_modes = ["central"]\n')
    with pytest.raises(SweepError, match="dp_modes"):
        load_spec(bad)


def _fake_by_mode(point: Point, folder: Path, tick: object) -> Measured:
    measured = _fake(point)
    if point.dp_mode == "distributed":
        measured.result["accuracy"] -= 0.05
        measured.result["epsilon_local_max"] = 7.5
    return measured


def test_results_record_the_dp_mode(tmp_path: Path) -> None:
    spec = _spec(**DISTRIBUTED)
    run_sweep(spec, tmp_path, runner=_fake_by_mode)
    rows = ResultsStore(tmp_path).finished()
    modes = {(r["kind"], r["epsilon"], r["dp_mode"], r["epsilon_local_max"]) for r in rows.values()}
    assert modes == {
        ("central", "1.0", "central", ""),
        ("central", "inf", "off", ""),
        ("federated", "1.0", "local", ""),
        ("federated", "1.0", "distributed", "7.5"),
        ("federated", "inf", "off", ""),
    }
    assert run_sweep(spec, tmp_path, runner=_fake_by_mode).ran == 0


REPORTS = Path(__file__).parents[1] / "simulations" / "reports"


def test_results_written_before_the_dp_mode_column_are_read_and_extended(
    tmp_path: Path,
) -> None:
    shutil.copy(REPORTS / "small" / "results.csv", tmp_path / "results.csv")
    old = ResultsStore(tmp_path).rows()
    assert old and "dp_mode" not in (tmp_path / "results.csv").read_text().splitlines()[0]
    expected = {
        (r["kind"], math.isfinite(float(r["epsilon"]))): mode
        for r in old
        for mode in [r["dp_mode"]]
    }
    assert expected == {
        ("central", True): "central",
        ("central", False): "off",
        ("federated", True): "local",
        ("federated", False): "off",
    }
    results, _, _ = load(tmp_path)
    assert set(results["dp_mode"]) == {"central", "off", "local"}
    assert not results["setting"].str.contains("distributed").any()

    # resuming the old sweep with a distributed point rewrites the file under the new header
    point = Point(
        kind="federated", task="digits", epsilon=1.0, seed=1, nodes=5, dp_mode="distributed"
    )
    ResultsStore(tmp_path).record({"point_id": point.id, "dp_mode": "distributed", "status": "ok"})
    with open(tmp_path / "results.csv", newline="") as handle:
        assert next(csv.reader(handle)) == RESULT_COLUMNS
    rows = ResultsStore(tmp_path).rows()
    assert [r["point_id"] for r in rows] == [*(r["point_id"] for r in old), point.id]
    assert [r["dp_mode"] for r in rows] == [*(r["dp_mode"] for r in old), "distributed"]
    assert [r["accuracy"] for r in rows[:-1]] == [r["accuracy"] for r in old]


def test_the_report_shows_local_distributed_and_central_side_by_side(tmp_path: Path) -> None:
    spec = _spec(seeds=[1, 2], membership=True, **DISTRIBUTED)
    run_sweep(spec, tmp_path, runner=_fake_by_mode)
    results, _, _ = load(tmp_path)

    table = utility_table(results, "breast-cancer")
    assert list(table.index) == [
        "3 nodes, iid, secagg",
        "3 nodes, iid, secagg, distributed DP",
        "central",
        "central DP-SGD",
    ]
    assert list(table.loc["3 nodes, iid, secagg, distributed DP"]) == ["86.5 ± 0.7 (2)", ""]
    assert list(table.loc["3 nodes, iid, secagg"]) == ["91.5 ± 0.7 (2)", "96.5 ± 0.7 (2)"]
    gaps = gap_table(results, "breast-cancer").set_index(["setting", "epsilon"])
    assert gaps.loc[
        ("3 nodes, iid, secagg, distributed DP", "1"), "vs central DP-SGD (points)"
    ] == ("-5.0")
    attack = membership_table(results)
    assert set(zip(attack["kind"], attack["dp_mode"], strict=True)) == {
        ("central", "central"),
        ("central", "off"),
        ("federated", "local"),
        ("federated", "distributed"),
        ("federated", "off"),
    }

    report = build_report(tmp_path).read_text()
    assert "| 3 nodes, iid, secagg, distributed DP | 86.5 ± 0.7 (2) |  |" in report
    assert "| 3 nodes, iid, secagg, distributed DP | 1 | 1 | 7.5 |" in report  # own share alone
    assert "distributed epsilon" in report


def test_a_budget_table_refines_the_distributed_settings_at_its_epsilon() -> None:
    from fedaiot.experiments.spec import SweepSpec, expand

    spec = SweepSpec(
        tasks=["digits"],
        epsilons=[1.0, 3.0],
        dp_modes=["distributed"],
        seeds=[1],
        distributed={
            "digits": {"num-rounds": 90, "learning-rate": 1.0, "epsilon-1": {"learning-rate": 0.5}}
        },
    )
    steps = {
        p.epsilon: (p.rounds, p.overrides["learning-rate"])
        for p in expand(spec)
        if p.kind == "federated"
    }
    assert steps == {1.0: (90, 0.5), 3.0: (90, 1.0)}
    with pytest.raises(ValueError, match=r"epsilon-2.*not one of the sweep's epsilons"):
        SweepSpec(tasks=["digits"], epsilons=[1.0], distributed={"digits": {"epsilon-2": {}}})
