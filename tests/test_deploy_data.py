"""An institution's files against the task's schema; a deployed round on them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export, raw_partitions
from fedaiot.node.deployed import (
    NodeConfigError,
    NodeSettings,
    default_ledger_dir,
    deployed_round,
)
from fedaiot.node.local_data import LocalDataError, load_local, schema_of
from fedaiot.node.round import simulated_partition
from fedaiot.privacy.ledger import dataset_fingerprint, ledger_path
from fedaiot.tasks import federate, get_task
from fedaiot.tasks.partition import standardize

BC = get_task("breast-cancer")
CFG = RunConfig(task="breast-cancer", num_rounds=2, epsilon=1.0, output_dir="/unused")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return export(CFG, 3, tmp_path_factory.mktemp("data"), ["alpha", "beta", "gamma"])


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_exported_files_standardize_to_the_simulated_partitions(files: list[Path]) -> None:
    normalization = federate(BC, 1, partitioner="iid", seed=CFG.seed).normalization
    for index, path in enumerate(files):
        mine = standardize(load_local(BC, path), normalization)
        simulated = simulated_partition(CFG, index, 3)
        np.testing.assert_array_equal(mine.x, simulated.x)
        np.testing.assert_array_equal(mine.y, simulated.y)


def test_columns_in_any_order_and_labels_as_indices(files: list[Path], tmp_path: Path) -> None:
    rows = _rows(files[1])
    order = list(reversed(range(len(rows[0]))))
    shuffled = [[row[i] for i in order] for row in rows]
    for row in shuffled[1:]:
        row[0] = str(BC.class_names.index(row[0]))  # the label column is first now
    data = load_local(BC, _write(tmp_path / "shuffled.csv", shuffled))
    np.testing.assert_array_equal(data.x, load_local(BC, files[1]).x)
    np.testing.assert_array_equal(data.y, load_local(BC, files[1]).y)


def test_parquet_is_read_like_csv(files: list[Path], tmp_path: Path) -> None:
    data = load_local(BC, files[2])
    columns = {name: data.x[:, i] for i, name in enumerate(BC.feature_names or [])}
    table = pa.table({**columns, "label": data.y})
    pq.write_table(table, tmp_path / "gamma.parquet")
    again = load_local(BC, tmp_path / "gamma.parquet")
    np.testing.assert_array_equal(again.x, data.x)
    np.testing.assert_array_equal(again.y, data.y)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: [row[1:] for row in r], "missing column 'mean radius'"),
        (
            lambda r: [r[0]] + [[*row[:3], "abc", *row[4:]] for row in r[1:]],
            "'mean area', row 1: 'abc' is not a",
        ),
        (
            lambda r: [r[0], r[1], [*r[2][:5], "", *r[2][6:]]],
            "'mean compactness': missing .* row 2",
        ),
        (
            lambda r: [r[0], [*r[1][:2], "nan", *r[1][3:]]],
            "'mean perimeter': missing .* row 1",
        ),
        (
            lambda r: [r[0], [*r[1][:2], "inf", *r[1][3:]]],
            "row 1: 'inf' is not a finite",
        ),
        (
            lambda r: [r[0], r[1], [*r[2][:-1], "maybe"]],
            "'label' holds 'maybe' at row 2",
        ),
        (
            lambda r: [r[0], [*r[1][:-1], "7"], r[2]],
            "'label' holds '7' at row 1",
        ),
        (lambda r: r[:2], "1 examples, the study needs at least 2"),
    ],
    ids=["missing", "text", "empty", "nan", "inf", "label", "index", "too-few"],
)
def test_csv_off_schema_is_refused_naming_the_fault(
    files: list[Path], tmp_path: Path, change: object, message: str
) -> None:
    rows = change(_rows(files[2]))  # type: ignore[operator]
    with pytest.raises(LocalDataError, match=message) as caught:
        load_local(BC, _write(tmp_path / "bad.csv", rows))
    assert "\n" not in str(caught.value)


def test_columns_the_task_does_not_name_are_ignored(files: list[Path], tmp_path: Path) -> None:
    rows = _rows(files[2])
    with_id = [["patient-id", *rows[0]]] + [[f"p{i}", *row] for i, row in enumerate(rows[1:])]
    data = load_local(BC, _write(tmp_path / "with_id.csv", with_id))
    np.testing.assert_array_equal(data.x, load_local(BC, files[2]).x)


def test_unsupported_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="does not exist"):
        load_local(BC, tmp_path / "nope.csv")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(LocalDataError, match=r"unsupported format \.xlsx"):
        load_local(BC, tmp_path / "data.xlsx")


def test_arrays_in_npz_and_class_folders(tmp_path: Path) -> None:
    task = get_task("basic-motions")
    assert schema_of(task).kind == "array"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 100)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    assert len(load_local(task, tmp_path / "ok.npz")) == 5
    np.savez(tmp_path / "shape.npz", x=x[:, :, :50], y=y)
    with pytest.raises(LocalDataError, match=r"x has shape \(5, 6, 50\).*expects \(n, 6, 100\)"):
        load_local(task, tmp_path / "shape.npz")
    np.savez(tmp_path / "labels.npz", x=x, y=y[:4])
    with pytest.raises(LocalDataError, match=r"y has shape \(4,\), expected \(5,\)"):
        load_local(task, tmp_path / "labels.npz")
    x[2, 1, 7] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with pytest.raises(LocalDataError, match=r"1 missing or non-finite values.*sample 2"):
        load_local(task, tmp_path / "nan.npz")
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 5, dtype=object), y=y)
    with pytest.raises(LocalDataError, match="unreadable"):  # never unpickled
        load_local(task, tmp_path / "objects.npz")

    folder = tmp_path / "motions"
    for index, name in enumerate(["walking", "running"]):
        (folder / name).mkdir(parents=True)
        np.save(folder / name / "0.npy", rng.normal(size=(6, 100)).astype(np.float32))
        np.save(folder / name / "1.npy", rng.normal(size=(6, 100)).astype(np.float32) + index)
    data = load_local(task, folder)
    assert sorted(data.y.tolist()) == [1, 1, 3, 3]
    np.save(folder / "running" / "2.npy", np.zeros((100, 6), dtype=np.float32))
    with pytest.raises(LocalDataError, match=r"2\.npy: sample has shape \(100, 6\).*\(6, 100\)"):
        load_local(task, folder)
    (folder / "swimming").mkdir()
    with pytest.raises(LocalDataError, match="folder 'swimming' is not a class"):
        load_local(task, folder)


def test_node_check_cli_exits_2_with_one_line(files: list[Path], tmp_path: Path) -> None:
    rows = [row[1:] for row in _rows(files[0])]
    bad = _write(tmp_path / "bad.csv", rows)
    cli = [sys.executable, "-m", "fedaiot", "node", "check", "--task", "breast-cancer"]
    done = subprocess.run([*cli, "--data", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "missing column 'mean radius'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    good = subprocess.run([*cli, "--data", str(files[0])], capture_output=True, text=True)
    assert good.returncode == 0 and "examples fit task breast-cancer" in good.stdout


def _round_config(server_round: int) -> dict[str, object]:
    normalization = federate(BC, 1, partitioner="iid", seed=CFG.seed).normalization
    return {
        "server-round": server_round,
        "run-key": "run:abc",
        "normalization-mean": normalization["mean"],
        "normalization-std": normalization["std"],
    }


def _settings(
    path: Path, ledger: Path, cap: float | None = None, name: str = "gamma"
) -> NodeSettings:
    return NodeSettings(path, name, "breast-cancer", ledger, cap)


def _ledger_of(settings: NodeSettings) -> dict:
    dataset = dataset_fingerprint(load_local(BC, settings.data_path))
    return json.loads(ledger_path(settings.ledger_dir, dataset).read_text())


def test_deployed_round_keeps_its_ledger_next_to_the_data(files: list[Path]) -> None:
    settings = NodeSettings.from_node_config(
        {"data-path": str(files[2]), "node-name": "gamma", "task": "breast-cancer"}
    )
    assert settings.ledger_dir == default_ledger_dir(files[2]) == files[2].parent / ".fedaiot"
    torch.manual_seed(0)
    state = BC.build_model().state_dict()
    reply = deployed_round(CFG, settings, _round_config(1), state)
    assert reply.status == "trained"
    assert reply.node == ""  # the coordinator names the node from its authenticated key
    assert reply.metrics["examples"] == 45  # the node's own console; the wire gets the weight
    ledger = _ledger_of(settings)
    assert [r["round"] for r in ledger["rounds"]] == [1]
    assert ledger["count"]["value"] == reply.weight
    assert 0 < reply.metrics["epsilon"] <= 1.0


def test_node_cap_lowers_the_budget_and_never_raises_it(files: list[Path], tmp_path: Path) -> None:
    state = BC.build_model().state_dict()
    low = deployed_round(CFG, _settings(files[2], tmp_path / "low", 0.05), _round_config(1), state)
    assert low.status == "refused" and low.reason == "budget-exhausted"
    high = _settings(files[2], tmp_path / "high", 50.0)
    reply = deployed_round(CFG, high, _round_config(1), state)
    plan = _ledger_of(high)["plans"]["run:abc"]
    assert reply.status == "trained" and plan["target_epsilon"] == CFG.epsilon


def test_a_node_restarted_under_another_name_refuses_once_the_data_is_spent(
    files: list[Path], tmp_path: Path
) -> None:
    """The same CSV under another --name (and in another format) draws on one budget."""
    state = BC.build_model().state_dict()
    ledgers = tmp_path / "ledgers"
    for server_round in (1, 2):
        reply = deployed_round(
            CFG, _settings(files[0], ledgers), _round_config(server_round), state
        )
        assert reply.status == "trained"
    spent = reply.metrics["epsilon"]
    assert spent > 0.95 * CFG.epsilon
    table = pa.Table.from_pandas(__import__("pandas").read_csv(files[0]))
    renamed = tmp_path / "export.parquet"
    pq.write_table(table, renamed)
    another_run = {**_round_config(1), "run-key": "other-study:def"}
    again = deployed_round(CFG, _settings(renamed, ledgers, name="delta"), another_run, state)
    assert again.status == "refused" and again.reason == "budget-exhausted"
    assert again.metrics["epsilon"] == pytest.approx(spent)


def test_a_deployed_node_refuses_seeded_noise(files: list[Path], tmp_path: Path) -> None:
    from fedaiot.node.deployed import SeededNoiseRefused

    seeded = CFG.model_copy(update={"seeded_noise": True})
    state = BC.build_model().state_dict()
    with pytest.raises(SeededNoiseRefused, match="own secure generator"):
        deployed_round(seeded, _settings(files[2], tmp_path), _round_config(1), state)
    assert SeededNoiseRefused.reason == "seeded-noise-refused"
    assert not list(tmp_path.glob("ledger-*.json"))  # refused before anything was charged


def test_deployed_round_refuses_another_task_or_missing_statistics(
    files: list[Path], tmp_path: Path
) -> None:
    state = BC.build_model().state_dict()
    digits = CFG.model_copy(update={"task": "digits"})
    with pytest.raises(NodeConfigError, match="holds breast-cancer data, the run is for"):
        deployed_round(digits, _settings(files[2], tmp_path), _round_config(1), state)
    config = {"server-round": 1, "run-key": "k"}
    with pytest.raises(NodeConfigError, match="sent no statistics"):
        deployed_round(CFG, _settings(files[2], tmp_path), config, state)
    short = {**_round_config(1), "normalization-mean": [0.0] * 3}
    with pytest.raises(NodeConfigError, match="mean has 3 values"):
        deployed_round(CFG, _settings(files[2], tmp_path), short, state)
    assert not math.isnan(len(raw_partitions(CFG, 3)[0]))


def test_a_node_holds_its_reply_to_the_next_multiple_of_reply_every(
    files: list[Path], tmp_path: Path
) -> None:
    """What the coordinator can time is how many multiples a round took, not how long: a
    reply that took 0.5 s and one that took 4 s both come at 5 s."""
    import time

    from fedaiot.node import requests

    settings = NodeSettings(files[1], "beta", "breast-cancer", tmp_path, reply_every=5.0)
    assert NodeSettings.from_node_config(settings.to_node_config()) == settings
    state = BC.build_model().state_dict()
    started = time.monotonic()
    reply = requests.train(
        CFG, settings.to_node_config(), _round_config(1), state, released_on_return=True
    )
    assert reply.status == "trained"
    assert time.monotonic() - started >= 5.0  # a lower bound: a loaded machine only adds


@pytest.mark.parametrize(
    ("took", "every", "sleeps"),
    [(0.5, 5.0, 4.5), (4.0, 5.0, 1.0), (7.5, 5.0, 2.5), (10.0, 5.0, 0.0)],
)
def test_the_hold_reaches_the_next_multiple(
    monkeypatch: pytest.MonkeyPatch, took: float, every: float, sleeps: float
) -> None:
    from fedaiot.node import requests
    from fedaiot.wire.replies import NodeReply

    clock = iter([100.0, 100.0 + took])
    slept: list[float] = []
    monkeypatch.setattr(requests.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(requests.time, "sleep", slept.append)
    held = NodeReply(status="refused", node="", weight=0.0, metrics={})
    settings = NodeSettings(Path("d"), "n", "breast-cancer", Path("l"), reply_every=every)
    source = requests.Source("", Path("l"), settings=settings)
    assert requests.held(source, lambda: held) is held
    assert slept == [pytest.approx(sleeps)]


@pytest.mark.parametrize("every", [0, -1, 3601])
def test_reply_every_out_of_range_is_refused_before_the_node_starts(
    files: list[Path], tmp_path: Path, every: float
) -> None:
    from fedaiot.deploy.supernode import prepare

    with pytest.raises(NodeConfigError, match="reply-every must be more than 0 and at most 3600"):
        prepare(task="breast-cancer", data=files[0], name="alpha", reply_every=every)
    config = {"data-path": str(files[0]), "node-name": "a", "task": "breast-cancer"}
    with pytest.raises(NodeConfigError, match="reply-every"):
        NodeSettings.from_node_config({**config, "reply-every": every})
