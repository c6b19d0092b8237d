"""Keys advertised and shared one round ahead (the keys with the masked inputs, the shares with
the unmask answers): two exchanges a secure round instead of four, and nothing more in the
clear. Played in-process through the real coordinator and ClientApp handlers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedaiot.config.run import RunConfig
from fedaiot.rounds.loop import RoundLoop
from fedaiot.secure_rounds.keys import KeyChain, Prepared
from fedaiot.simulation.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def _cfg(tmp_path: Path, name: str, **overrides: Any) -> RunConfig:
    fields = {
        "task": "breast-cancer",
        "num_rounds": 3,
        "epsilon": 2.0,
        "min_available_nodes": 5,
        "secagg_collusion": 0.4,
    }
    return RunConfig(**{**fields, **overrides}, output_dir=str(tmp_path / name))


def _rounds(cfg: RunConfig) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (cfg.output_path / "journal.jsonl").open()]
    return [e for e in events if e["event"] == "round"]


def _final(cfg: RunConfig, grid: InProcessGrid) -> dict[str, torch.Tensor]:
    loop = RoundLoop(cfg)
    assert loop.run_rounds(grid)["status"] == "completed"
    weights, _ = loop.registry.load(loop.registry.versions()[-1])
    return weights


def test_keys_made_ahead_save_two_exchanges_and_change_nothing_else(tmp_path: Path) -> None:
    # the same (seeded, research-only) noise with and without secure aggregation
    plain_cfg = _cfg(tmp_path, "plain", secure_aggregation=False, seeded_noise=True)
    plain = _final(plain_cfg, InProcessGrid(plain_cfg, 5))
    cfg = _cfg(tmp_path, "chained", seeded_noise=True)
    secure = _final(cfg, InProcessGrid(cfg, 5))
    rounds = _rounds(cfg)
    assert [r["exchanges"] for r in rounds] == [4, 2, 2]
    assert [r["secure_aggregation"]["keys_ahead"] for r in rounds] == [False, True, True]
    assert [r["secure_aggregation"]["shares_ahead"] for r in rounds] == [False, True, True]
    assert [r["exchanges"] for r in _rounds(plain_cfg)] == [1, 1, 1]
    for r in rounds:
        assert r["secure_aggregation"]["error"] == "" and r["secure_aggregation"]["dropped"] == {}
        ahead = r["secure_aggregation"]["keys_ahead"]
        assert ("advertise" in r["stage_seconds"]) != ahead
        assert ("share" in r["stage_seconds"]) != ahead
    for name, tensor in plain.items():  # three chained rounds, each within quantisation
        assert torch.allclose(secure[name], tensor, atol=1e-5, rtol=0), name


def test_what_rides_ahead_is_public_keys_and_encrypted_shares_only(tmp_path: Path) -> None:
    from clients import client_app
    from fedaiot.secure_rounds.wire import NEXT, SECAGG

    cfg = _cfg(tmp_path, "answers", num_rounds=2)
    trained: list[Any] = []
    unmasked: list[Any] = []

    def recording(handler, seen):  # type: ignore[no-untyped-def]
        def handle(message, context):  # type: ignore[no-untyped-def]
            reply = handler(message, context)
            seen.append((dict(message.content.config_records), reply.content))
            return reply

        return handle

    overrides = {
        (0, "train.secagg"): recording(client_app.train_and_mask, trained),
        (0, "query.secagg_unmask"): recording(client_app.unmask, unmasked),
    }
    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides=overrides))
    (train_one, masked_one), (train_two, masked_two) = trained
    (unmask_one, answer_one), (unmask_two, answer_two) = unmasked
    # no keys for a round that never comes
    assert NEXT in train_one and NEXT not in train_two
    assert NEXT in unmask_one and NEXT not in unmask_two
    next_round = dict(train_one[NEXT])["round_id"]
    # the masked reply carries the next round's public keys, nothing else of it
    advert = dict(masked_one.config_records[NEXT])
    assert set(advert) == {"node_id", "round_id", "enc_public", "mask_public"}
    assert advert["round_id"] == next_round != dict(masked_one.config_records[SECAGG])["round_id"]
    assert NEXT not in masked_two.config_records
    # the unmask answer: this round's shares, and the next round's shares sealed to neighbours
    assert set(answer_one.config_records) == {SECAGG, NEXT}
    bundle = dict(answer_one.config_records[NEXT])
    assert set(bundle) == {"node_id", "round_id", "recipients", "ciphertexts"}
    assert bundle["round_id"] == next_round == dict(unmask_one[NEXT])["round_id"]
    assert dict(answer_one.config_records[SECAGG])["round_id"] != next_round
    assert not answer_one.array_records and not answer_one.metric_records
    assert set(answer_two.config_records) == {SECAGG}


def test_a_node_whose_shares_are_lost_sits_one_round_out_and_comes_back(tmp_path: Path) -> None:
    from clients import client_app

    cfg = _cfg(tmp_path, "lost", num_rounds=3)
    calls = {"n": 0}

    def first_answer_lost(message, context):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        reply = client_app.unmask(message, context)
        return None if calls["n"] == 1 else reply  # round 1's shares and round 2's lost

    grid = InProcessGrid(cfg, 5, overrides={(4, "query.secagg_unmask"): first_answer_lost})
    _final(cfg, grid)
    one, two, three = _rounds(cfg)
    assert one["secure_aggregation"]["dropped"] == {}  # four shares of five rebuild the masks
    assert "no message at key sharing" in two["secure_aggregation"]["dropped"]["node-4"]
    assert two["secure_aggregation"]["shares_ahead"] and two["exchanges"] == 2
    assert sorted(r["node"] for r in two["replies"]) == ["node-0", "node-1", "node-2", "node-3"]
    # round 2 asked node-4 for its keys and its shares for round 3 in messages of their own
    assert [r["status"] for r in three["replies"]] == ["trained"] * 5
    assert three["secure_aggregation"]["shares_ahead"]
    assert three["secure_aggregation"]["dropped"] == {} and three["exchanges"] == 2


def test_a_node_is_never_charged_for_a_round_it_could_not_mask(tmp_path: Path) -> None:
    from clients import client_app
    from fedaiot.secure_rounds.wire import SECAGG

    cfg = _cfg(tmp_path, "replayed", num_rounds=1)

    def wrong_round(message, context):  # type: ignore[no-untyped-def]
        record = dict(message.content.config_records[SECAGG])
        record["round_id"] = int(record["round_id"]) ^ 1  # shares of another round
        from flwr.app import ConfigRecord

        message.content[SECAGG] = ConfigRecord(record)
        return client_app.train_and_mask(message, context)

    RoundLoop(cfg).run_rounds(InProcessGrid(cfg, 5, overrides={(2, "train.secagg"): wrong_round}))
    (event,) = _rounds(cfg)
    statuses = sorted((r["status"], r["problem"]) for r in event["replies"])
    assert statuses == [("failed", "protocol-error"), *[("trained", "")] * 4]
    ledgers = [
        json.loads(p.read_text()) for p in (cfg.output_path / "ledgers").rglob("ledger-*.json")
    ]
    assert sorted(len(ledger["rounds"]) for ledger in ledgers) == [1, 1, 1, 1]  # node-2: none


def _node_context() -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_a_fresh_advert_drops_the_keys_made_ahead() -> None:
    from fedaiot.secagg import RoundSetup
    from fedaiot.secure_rounds import handlers

    context = _node_context()
    current = RoundSetup.create([1, 2, 3], vector_length=4, degree=2, threshold=2)
    handlers.advertise({**current.to_record(), "node": 1}, context)
    ahead = RoundSetup.create([1, 2, 3], vector_length=4, degree=2, threshold=2)
    handlers.advertise_ahead({**ahead.to_record(), "node": 1}, context)
    fresh = RoundSetup.create([1, 2, 3], vector_length=4, degree=2, threshold=2)
    handlers.advertise({**fresh.to_record(), "node": 2}, context)
    assert set(context.state.keys()) == {"secagg-setup", "secagg-client"}
    kept = dict(context.state.config_records["secagg-setup"])
    assert kept["round_id"] == fresh.round_id


def test_the_next_rounds_first_message_ends_the_round_before() -> None:
    """Keys made ahead wait beside the current round; a message of the next round makes them
    current and forgets the round before, whose messages are refused from then on."""
    from fedaiot.secagg import KeyAdvert, NeighbourKeys, RoundSetup, SecAggError, UnmaskRequest
    from fedaiot.secure_rounds import handlers
    from fedaiot.secure_rounds.wire import pack

    setups = [RoundSetup.create([1, 2, 3], vector_length=4, degree=2, threshold=2) for _ in "ab"]
    contexts = {i: _node_context() for i in (1, 2, 3)}
    adverts: dict[int, list[KeyAdvert]] = {0: [], 1: []}
    for i, context in contexts.items():
        adverts[0].append(
            KeyAdvert.from_record(handlers.advertise({**setups[0].to_record(), "node": i}, context))
        )
        adverts[1].append(
            KeyAdvert.from_record(
                handlers.advertise_ahead({**setups[1].to_record(), "node": i}, context)
            )
        )
    assert set(contexts[1].state.keys()) == {
        "secagg-setup", "secagg-client", "secagg-next-setup", "secagg-next-client"
    }  # fmt: skip

    def keys(k: int) -> dict[str, Any]:  # node 1's neighbour keys in round k
        others = {a.node_id: (a.enc_public, a.mask_public) for a in adverts[k] if a.node_id != 1}
        return NeighbourKeys(setups[k].round_id, others).to_record()

    # the current round's stage still works while the next round's keys wait
    handlers.share_keys(pack(keys(0)), contexts[1])
    assert dict(contexts[1].state.config_records["secagg-setup"])["round_id"] == setups[0].round_id
    # the next round's keys arrive: its secrets become the current ones, the round before goes
    bundle = handlers.share_ahead(keys(1), contexts[1])
    assert bundle["round_id"] == setups[1].round_id and "failed" not in bundle
    assert set(contexts[1].state.keys()) == {"secagg-setup", "secagg-client"}
    assert dict(contexts[1].state.config_records["secagg-setup"])["round_id"] == setups[1].round_id
    late = UnmaskRequest(setups[0].round_id, [1, 2, 3], [], {})
    with pytest.raises(SecAggError, match="unmask out of order"):
        handlers.unmask(pack(late.to_record()), contexts[1])
    assert not set(contexts[1].state.keys())  # a refused unmask request ends the round too
    # keys of a round this node never made keys for: refused, with the reason code only
    stray = RoundSetup.create([1, 2, 3], vector_length=4, degree=2, threshold=2)
    refused = handlers.share_ahead(NeighbourKeys(stray.round_id, {}).to_record(), contexts[2])
    assert refused == {"failed": "protocol-error"}
    assert not set(contexts[2].state.keys())  # and it keeps nothing of either round


def test_keys_ahead_are_used_only_by_the_aggregation_they_were_made_for() -> None:
    from fedaiot.secagg import KeyAdvert, RoundSetup

    setup = RoundSetup.create([1, 2, 3], vector_length=10, degree=2, threshold=2)
    adverts = [KeyAdvert(i, setup.round_id, b"\0" * 32, b"\1" * 32) for i in (1, 2, 3)]

    def chain() -> KeyChain:
        return KeyChain(prepared=Prepared(setup, {7: 1, 8: 2, 9: 3}, False, list(adverts)))

    assert chain().take([9, 8, 7], 10, integers=False) is not None  # any order
    assert chain().take([7, 8], 10, integers=False) is None  # another node set
    assert chain().take([7, 8, 9], 11, integers=False) is None  # a vector of another length
    assert chain().take([7, 8, 9], 10, integers=True) is None  # integers instead of reals
    partial = KeyChain(prepared=Prepared(setup, {7: 1, 8: 2, 9: 3}, False, adverts[:2]))
    assert partial.take([7, 8, 9], 10, integers=False) is None  # a node missed: afresh
    used = chain()
    assert used.take([7, 8, 9], 10, integers=False) is not None
    assert used.take([7, 8, 9], 10, integers=False) is None  # at most once
