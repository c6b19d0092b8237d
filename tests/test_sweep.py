"""The sweep: points, failures recorded, interrupted sweeps resumed, and the report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedaiot.cli.main import app
from fedaiot.experiments.report import build_report
from fedaiot.experiments.results import ResultsStore
from fedaiot.experiments.runner import Measured, measure, run_sweep
from fedaiot.experiments.spec import Point, SweepError, SweepSpec, expand, load_spec

CENTRAL = {"breast-cancer": {"epochs": 2, "batch-size": 64, "learning-rate": 0.2}}


def _spec(**fields: object) -> SweepSpec:
    values: dict[str, object] = {
        "name": "t",
        "tasks": ["breast-cancer"],
        "epsilons": [1.0, math.inf],
        "nodes": [3],
        "partitions": ["iid"],
        "secure_aggregation": [False],
        "seeds": [1],
        "rounds": 2,
        "membership": False,
        "central": CENTRAL,
        **fields,
    }
    return SweepSpec.model_validate(values)


def test_points_have_stable_ids_and_a_scenario_control_is_the_grid_point() -> None:
    spec = _spec(
        epsilons=[4.0],
        scenarios=[{"name": "drop", "drop_rate": 0.3}],
        scenario_base={
            "task": "breast-cancer",
            "epsilon": 4.0,
            "nodes": 3,
            "partition": "iid",
            "secure_aggregation": False,
            "seeds": [1],
        },
    )
    points = expand(spec)
    assert [p.id for p in points] == [p.id for p in expand(spec)]
    kinds = [(p.kind, p.scenario) for p in points]
    # central, the grid point (which is also the scenario's control), the scenario
    assert kinds == [("central", "none"), ("federated", "none"), ("federated", "drop")]
    assert points[2].run_config(Path("/x")).fault_drop_rate == 0.3


def test_a_bad_sweep_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\npartitions = ["dirichlet-0"]\n')
    with pytest.raises(SweepError, match="dirichlet-0"):
        load_spec(bad)
    bad.write_text('tasks = ["no-such-task"]\n')
    with pytest.raises(SweepError, match="no-such-task"):
        load_spec(bad)
    bad.write_text("[run_config.digits]\nlearning-rat = 0.1\n")
    with pytest.raises(SweepError, match="learning-rat"):
        load_spec(bad)
    with pytest.raises(SweepError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_a_failed_point_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # 1000 breast-cancer nodes cannot each hold a record: the federated points fail
    # before Flower starts, the central baselines are measured
    spec = _spec(nodes=[1000])
    outcome = run_sweep(spec, tmp_path)
    assert (outcome.points, outcome.ran, outcome.failed) == (4, 4, 2)
    rows = ResultsStore(tmp_path).finished()
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert {r["kind"] for r in failed} == {"federated"}
    assert all("1000" in r["error"] and "nodes" in r["error"] for r in failed)
    measured = [r for r in rows.values() if r["status"] == "ok"]
    assert {r["kind"] for r in measured} == {"central"}
    assert all(0.5 < float(r["accuracy"]) <= 1.0 for r in measured)

    again = run_sweep(spec, tmp_path)  # failures stay recorded: nothing to do
    assert (again.ran, again.skipped) == (0, 4)
    retried = run_sweep(spec, tmp_path, retry_failed=True)
    assert (retried.ran, retried.failed) == (2, 2)
    assert len(ResultsStore(tmp_path).rows()) == 6  # every attempt is kept; the last counts


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    spec = _spec(seeds=[1, 2])  # 4 central + 4 federated points
    calls: list[str] = []

    def interrupted(point: Point, folder: Path, tick: object) -> Measured:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(point.id)
        return _fake(point)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, runner=interrupted)
    assert len(ResultsStore(tmp_path).rows()) == 3

    resumed: list[str] = []

    def counting(point: Point, folder: Path, tick: object) -> Measured:
        resumed.append(point.id)
        return _fake(point)

    outcome = run_sweep(spec, tmp_path, runner=counting)
    assert (outcome.skipped, outcome.ran) == (3, 5)
    assert not set(resumed) & set(calls)
    ids = [r["point_id"] for r in ResultsStore(tmp_path).rows()]
    assert sorted(ids) == sorted(p.id for p in expand(spec))  # each point exactly once


def test_a_half_written_last_line_is_ignored(tmp_path: Path) -> None:
    spec = _spec(epsilons=[math.inf])
    run_sweep(spec, tmp_path, runner=lambda p, f, t: _fake(p))
    with open(tmp_path / "results.csv", "a") as handle:
        handle.write("deadbeef,central,breast")  # a crash mid-write
    store = ResultsStore(tmp_path)
    assert len(store.rows()) == 2
    assert "deadbeef" not in store.finished()


def _fake(point: Point) -> Measured:
    accuracy = 0.9 if point.private else 0.95
    rounds = [
        {
            "round": r,
            "accuracy": accuracy - 0.1 / r,
            "loss": 0.3,
            "seconds": 1.0,
            "trained": 3,
            "refused": 0,
            "failed": 0,
            "epsilon_spent_max": r * 0.4 if point.private else None,
        }
        for r in range(1, point.rounds + 1)
    ]
    nodes = [
        {
            "round": r,
            "node": f"node-{n}",
            "status": "trained",
            "epsilon": r * 0.4 if point.private else None,
            "budget": point.epsilon,
        }
        for r in range(1, point.rounds + 1)
        for n in range(3)
    ]
    result = {
        "status": "ok",
        "accuracy": accuracy + 0.01 * point.seed,
        "loss": 0.3,
        "epsilon_spent_max": point.epsilon,
        "mia_loss_auc": 0.5 if point.private else 0.6,
        "mia_calibrated_auc": 0.52 if point.private else 0.65,
    }
    return Measured(result, rounds, nodes)


def test_the_report_is_built_from_a_small_results_file(tmp_path: Path) -> None:
    spec = _spec(
        seeds=[1, 2],
        nodes=[3, 1000],
        scenarios=[{"name": "drop", "drop_rate": 0.3}],
        scenario_base={
            "task": "breast-cancer",
            "epsilon": 1.0,
            "nodes": 3,
            "partition": "iid",
            "secure_aggregation": False,
            "seeds": [1],
        },
    )

    def fake_or_fail(point: Point, folder: Path, tick: object) -> Measured:
        if point.nodes == 1000:
            raise ValueError("1000 nodes but 455 records")
        return _fake(point)

    run_sweep(spec, tmp_path, runner=fake_or_fail)
    report = build_report(tmp_path).read_text()

    assert "| setting | 1 | non-private |" in report
    assert "3 nodes, iid, plain | 91.5 ± 0.7 (2) | 96.5 ± 0.7 (2) |" in report
    assert "central DP-SGD | 91.5 ± 0.7 (2) |" in report
    assert "## Membership inference" in report and "## Operational scenarios" in report
    assert "1000 nodes but 455 records" in report  # the failed points are listed
    for name in (
        "accuracy_vs_epsilon",
        "accuracy_per_round",
        "node_epsilon",
        "membership",
        "scenarios",
    ):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}.png" in report


def test_fedaiot_report_names_a_folder_without_results(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no results.csv" in result.output


def test_results_columns_match_what_measure_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point = expand(_spec(epsilons=[math.inf]))[0]
    measured = measure(point, tmp_path, lambda r: None, membership=False)
    ResultsStore(tmp_path).record({"point_id": point.id, **measured.result})
    with open(tmp_path / "results.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["accuracy"]) > 0.8
    assert row["epsilon_spent_max"] == "inf"
    # measured again (its row lost, its run kept, or run elsewhere): the finished run is read
    # back as it ended, without starting Flower again
    import fedaiot.simulation.engine as engine

    monkeypatch.setattr(engine, "simulate", lambda *args, **kwargs: pytest.fail("ran again"))
    again = measure(point, tmp_path, lambda r: None, membership=False)
    assert again.result["accuracy"] == measured.result["accuracy"]
    assert again.rounds == measured.rounds


def test_a_retried_point_starts_afresh_and_its_failed_run_is_kept(tmp_path: Path) -> None:
    # a failed run's journal would be resumed after its last round, and fail again at once
    spec = _spec(epsilons=[1.0])
    seen: list[bool] = []

    def fails_once(point: Point, folder: Path, tick: object) -> Measured:
        if point.kind == "central":
            return _fake(point)
        run_dir = folder / "runs" / point.id
        seen.append(run_dir.exists())
        if len(seen) == 1:
            run_dir.mkdir(parents=True)
            (run_dir / "journal.jsonl").write_text('{"event": "end"}\n')
            raise RuntimeError("no round aggregated any update")
        return _fake(point)

    assert run_sweep(spec, tmp_path, runner=fails_once).failed == 1
    assert run_sweep(spec, tmp_path, runner=fails_once, retry_failed=True).failed == 0
    assert seen == [False, False]
    (point_id,) = [k for k, r in ResultsStore(tmp_path).finished().items() if r["nodes"] != "0"]
    kept = tmp_path / "runs" / f"{point_id}.failed-1" / "journal.jsonl"
    assert kept.read_text() == '{"event": "end"}\n'
