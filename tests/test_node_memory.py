"""What a long-lived node process keeps between rounds: no secure-aggregation state, no new data
cache entries, and none of the heap it freed (every ClientApp message hands it back).

The memory itself is measured by ``simulations/bench_worker_memory.py``, not here: a threshold
on a process's size would depend on the machine and flake.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from fedaiot.config.run import RunConfig
from fedaiot.node import memory
from fedaiot.rounds.loop import RoundLoop
from fedaiot.secure_rounds import handlers
from fedaiot.simulation.inprocess import InProcessGrid
from fedaiot.tasks import partition

pytestmark = pytest.mark.usefixtures("flower_identity")


class CountingGrid(InProcessGrid):
    """Delivers as InProcessGrid does; counts the messages and notes, after each round's
    training, what the nodes and the data caches hold."""

    def __init__(self, cfg: RunConfig, nodes: int) -> None:
        super().__init__(cfg, nodes)
        self.delivered: Counter[str] = Counter()
        self.caches: list[tuple[int, int]] = []  # after each round's training
        self.states: list[list[list[str]]] = []  # each node's Context.state, before training

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        if "train.secagg" in kinds:
            self.states.append([list(c.state.keys()) for c in self.contexts])
        replies = super().send_and_receive(messages, timeout=timeout)
        self.delivered.update(m.metadata.message_type for m in messages)
        if "train.secagg" in kinds:
            sizes = (partition._load_raw.cache_info(), partition._plan_lru.cache_info())
            self.caches.append((sizes[0].currsize, sizes[1].currsize))
        return replies


def _two_secure_rounds(tmp_path: Path) -> CountingGrid:
    cfg = RunConfig(
        task="breast-cancer",
        num_rounds=2,
        epsilon=2.0,
        min_available_nodes=5,
        secagg_collusion=0.4,
        output_dir=str(tmp_path / "run"),
    )
    grid = CountingGrid(cfg, 5)
    summary = RoundLoop(cfg).run_rounds(grid)
    assert summary["status"] == "completed"
    return grid


def test_every_message_a_node_handles_hands_its_freed_heap_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[bool] = []
    monkeypatch.setattr(memory, "return_freed_heap", lambda: trims.append(True) or True)
    grid = _two_secure_rounds(tmp_path)
    # the keys, their shares, training with the masked input, the unmasking: every stage
    stages = {"query.secagg_advertise", "query.secagg_share", "train.secagg", "query.secagg_unmask"}
    assert stages <= set(grid.delivered)
    assert len(trims) == sum(grid.delivered.values())


def test_nodes_keep_nothing_from_one_round_to_the_next(tmp_path: Path) -> None:
    grid = _two_secure_rounds(tmp_path)
    # Before training a node holds only the round's key material (advertised first, or ahead
    # with the last unmask answer); the update, the floor and the pending charge a round stores
    # are gone when it ends, and what stays is at most the next round's keys.
    keys_only = {handlers._SETUP, handlers._CLIENT}
    assert len(grid.states) == 2
    assert all(set(state) <= keys_only for states in grid.states for state in states)
    assert all(set(context.state.keys()) <= keys_only for context in grid.contexts)
    # the task's data and its split are cached once per process, not once per round
    first, second = grid.caches
    assert first == second


def test_the_benchmark_switch_keeps_the_freed_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    if memory._malloc_trim() is None:
        pytest.skip("not glibc: there is no malloc_trim")
    monkeypatch.delenv(memory.KEEP_FREED_HEAP, raising=False)
    assert memory.return_freed_heap()
    monkeypatch.setenv(memory.KEEP_FREED_HEAP, "1")
    assert not memory.return_freed_heap()


def test_the_heap_is_handed_back_however_a_call_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[bool] = []
    monkeypatch.setattr(memory, "return_freed_heap", lambda: trims.append(True) or True)

    @memory.returns_freed_heap
    def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fails()
    assert memory.returns_freed_heap(lambda x: x + 1)(1) == 2
    assert len(trims) == 2
