"""Spare rounds: a round whose update left the nodes and is then run again (the coordinator was
interrupted before it could unmask) is charged again; the spares a deployment plans for keep
such a run from running out of budget before its last round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.node.round import train_round
from fedaiot.tasks import ArrayData, get_task


def _statuses(tmp_path: Path, spare_rounds: int) -> list[str]:
    cfg = RunConfig(
        task="breast-cancer", epsilon=1.0, num_rounds=2, sample_rate=0.5, spare_rounds=spare_rounds
    )
    rng = np.random.default_rng(0)
    data = ArrayData(rng.normal(size=(40, 30)).astype(np.float32), rng.integers(0, 2, 40))
    state = get_task("breast-cancer").build_model().state_dict()
    statuses = []
    for server_round in (1, 1, 2):  # round 1 run again after its update left
        torch.manual_seed(0)
        reply = train_round(
            cfg, node="n", data=data, global_state=state, server_round=server_round,
            run_key="run", ledger_dir=tmp_path / str(spare_rounds),
        )  # fmt: skip
        if reply.pending is not None:
            reply.pending.release()  # the update left the node, masked
        statuses.append(reply.status)
    return statuses


@pytest.mark.parametrize(("spare_rounds", "last"), [(0, "refused"), (1, "trained")])
def test_a_round_run_again_uses_a_spare(tmp_path: Path, spare_rounds: int, last: str) -> None:
    assert _statuses(tmp_path, spare_rounds) == ["trained", "trained", last]


def test_spares_are_left_out_of_the_run_fingerprint_when_unset() -> None:
    plain = RunConfig(task="breast-cancer")
    assert RunConfig(task="breast-cancer", spare_rounds=0).fingerprint() == plain.fingerprint()
    assert RunConfig(task="breast-cancer", spare_rounds=2).fingerprint() != plain.fingerprint()
    assert RunConfig(task="breast-cancer", num_rounds=3, spare_rounds=2).planned_rounds == 5
