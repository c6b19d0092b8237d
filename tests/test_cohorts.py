"""Growing data: records already trained on keep their spend, new records bring their own.

The attacker here is time: a node retrains on a file that gained records. If the grown file
counted as a new data set, the old records would get a fresh budget; if it counted as the old
one, the new records could never be used. Each cohort keeps its own ledger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.node.round import train_round
from fedaiot.privacy.budget import PendingRelease
from fedaiot.privacy.cohorts import INDEX_FILE, open_cohorts, restrict
from fedaiot.privacy.ledger import LedgerError, dataset_fingerprint, ledger_path
from fedaiot.tasks import ArrayData, get_task

CFG = RunConfig(task="breast-cancer", epsilon=1.0, num_rounds=2, sample_rate=0.5)


def _records(n: int, seed: int) -> ArrayData:
    rng = np.random.default_rng(seed)
    return ArrayData(rng.normal(size=(n, 30)).astype(np.float32), rng.integers(0, 2, n))


def _joined(*parts: ArrayData) -> ArrayData:
    return ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def _train(data: ArrayData, folder: Path, server_round: int, run: str = "r1"):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    state = get_task("breast-cancer").build_model().state_dict()
    return train_round(
        CFG, node="n", data=data, global_state=state, server_round=server_round,
        run_key=run, ledger_dir=folder,
    )  # fmt: skip


def test_the_first_cohort_is_the_data_set_as_before(tmp_path: Path) -> None:
    old = _records(40, 1)
    (cohort,) = open_cohorts(tmp_path, old)
    assert cohort.id == dataset_fingerprint(old)
    assert cohort.ledger.path == ledger_path(tmp_path, dataset_fingerprint(old))
    assert cohort.rows.tolist() == list(range(40))


def test_new_records_form_a_cohort_and_old_ones_stay_in_theirs(tmp_path: Path) -> None:
    old, new = _records(40, 1), _records(25, 2)
    (first,) = open_cohorts(tmp_path, old)
    grown = _joined(new, old)  # the new records first: order does not matter
    cohorts = open_cohorts(tmp_path, grown)
    assert [c.id for c in cohorts] == [first.id, dataset_fingerprint(new)]
    assert cohorts[0].rows.tolist() == list(range(25, 65))
    assert cohorts[1].rows.tolist() == list(range(25))
    again = open_cohorts(tmp_path, grown)  # reopening creates nothing
    assert [c.id for c in again] == [c.id for c in cohorts]
    assert len(json.loads((tmp_path / INDEX_FILE).read_text())["cohorts"]) == 2
    # records removed from the file: the rest are still known, no cohort is made
    (kept,) = open_cohorts(tmp_path, ArrayData(old.x[:10], old.y[:10]))
    assert kept.id == first.id and len(kept) == 10


def test_a_spent_cohort_sits_out_and_the_new_records_train_alone(tmp_path: Path) -> None:
    old, new = _records(40, 1), _records(25, 2)
    (first,) = open_cohorts(tmp_path, old)
    with first.ledger.update() as record:
        record.history = [(0.5, 0.5, 500)]  # the old records' budget is gone
    spent = first.ledger.read().model_dump()
    reply = _train(_joined(old, new), tmp_path, 1)
    assert reply.status == "trained"
    assert reply.metrics["examples"] == 25  # the new records only
    assert first.ledger.read().model_dump() == spent  # not charged, not touched
    fresh = json.loads(ledger_path(tmp_path, dataset_fingerprint(new)).read_text())
    assert [e["round"] for e in fresh["rounds"]] == [1]
    assert reply.metrics["epsilon"] <= CFG.epsilon


def test_every_cohort_that_can_pay_is_charged_at_the_newest_ones_noise(tmp_path: Path) -> None:
    old, new = _records(40, 1), _records(25, 2)
    _train(old, tmp_path, 1, run="campaign-1")  # the old records spend part of their budget
    reply = _train(_joined(old, new), tmp_path, 1, run="campaign-2")
    assert reply.metrics["examples"] == 65
    old_ledger = json.loads(ledger_path(tmp_path, dataset_fingerprint(old)).read_text())
    new_ledger = json.loads(ledger_path(tmp_path, dataset_fingerprint(new)).read_text())
    sigma = reply.metrics["noise-multiplier"]
    assert new_ledger["plans"]["campaign-2"]["noise_multiplier"] == sigma  # planned by the new
    assert old_ledger["rounds"][-1]["noise_multiplier"] == sigma  # charged as it ran
    # the node reports its worst-off records' epsilon: the old ones have spent more
    assert reply.metrics["epsilon"] == pytest.approx(old_ledger["rounds"][-1]["epsilon"])
    assert old_ledger["rounds"][-1]["epsilon"] > new_ledger["rounds"][-1]["epsilon"]
    # the charge of both is released together when the update leaves
    pending = PendingRelease.of(
        [open_cohorts(tmp_path, old)[0].ledger, open_cohorts(tmp_path, new)[0].ledger],
        "campaign-2",
        1,
    )
    again = PendingRelease.from_record(pending.to_record())
    assert again == pending


def test_every_cohort_spent_means_a_refusal(tmp_path: Path) -> None:
    old = _records(40, 1)
    (first,) = open_cohorts(tmp_path, old)
    with first.ledger.update() as record:
        record.history = [(0.5, 0.5, 500)]
    reply = _train(old, tmp_path, 1)
    assert reply.status == "refused" and reply.reason == "budget-exhausted"
    assert math.isfinite(reply.metrics["epsilon"]) and reply.metrics["epsilon"] > CFG.epsilon


def test_a_split_sees_its_own_rows_of_each_cohort(tmp_path: Path) -> None:
    old, new = _records(10, 1), _records(6, 2)
    cohorts = open_cohorts(tmp_path, old)
    cohorts = open_cohorts(tmp_path, _joined(old, new))
    test_rows = np.array([1, 3, 12, 15])  # two old records and two new ones
    seen = restrict(cohorts, test_rows)
    assert [(c.id, c.rows.tolist()) for c in seen] == [
        (cohorts[0].id, [0, 1]),
        (cohorts[1].id, [2, 3]),
    ]


def test_a_damaged_index_is_refused_in_one_line(tmp_path: Path) -> None:
    open_cohorts(tmp_path, _records(10, 1))
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(LedgerError, match=r"cohort index .* is unreadable") as caught:
        open_cohorts(tmp_path, _records(10, 1))
    assert "\n" not in str(caught.value)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "fedaiot-cohorts/1", "cohorts": [
        {"id": "0" * 64, "records": 10}]}))  # fmt: skip
    with pytest.raises(LedgerError, match=r"record digests .* are unreadable"):
        open_cohorts(tmp_path, _records(10, 1))
