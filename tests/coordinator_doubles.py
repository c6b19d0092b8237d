"""Malicious coordinators: the real secure-aggregation driver, altered only in what it relays.

Each double subclasses :class:`SecureAggregation` (the code the coordinator's ServerApp runs)
and rewrites the messages of one stage before they go out; everything else, the round loop,
the grid, the nodes, is the real thing. tests/test_malicious_coordinator.py plays them over the
in-process grid; tests/test_deploy_e2e.py plays them in a real coordinator's ServerApp process
through :func:`install`, which tests/coordinator_double/sitecustomize.py calls there.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from fedaiot.secagg import ConfirmRequest, NeighbourKeys, UnmaskRequest, crypto
from fedaiot.secure_rounds.driver import SecureAggregation
from fedaiot.secure_rounds.wire import CONFIRM, SHARE_KEYS, UNMASK

# "KIND:REPORT": which double the ServerApp of a deployed coordinator runs, and the file where
# it writes, after each stage, which institutions answered (the test's view of what it got).
DOUBLE_ENV = "FEDAIOT_TEST_DOUBLE"


class Double(SecureAggregation):
    """The real driver; subclasses alter what it relays. Keeps what the nodes sent back."""

    made: ClassVar[list[Double]] = []
    report: ClassVar[Path | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: dict[str, list[Any]] = {}
        Double.made.append(self)

    def tamper(self, message_type: str, outbox: dict[int, Any]) -> dict[int, Any]:
        return outbox

    def exchange(self, message_type: str, outbox: dict[int, Any], kind: Any, setup: Any) -> Any:
        replies = super().exchange(message_type, self.tamper(message_type, outbox), kind, setup)
        self._record(message_type, replies)
        return replies

    def unmask_and_prepare(self, requests: dict[int, Any], setup: Any, ahead: Any = None) -> Any:
        if ahead:  # the next round's keys, shared in this exchange: tampered as at SHARE_KEYS
            following, names = self.chain.prepared, self.names
            assert following is not None
            self.names = {
                following.ids[self.flower_of[i]]: name
                for i, name in names.items()
                if self.flower_of[i] in following.ids
            }  # the next round's protocol ids
            ahead = self.tamper(SHARE_KEYS, ahead)
            self.names = names
        shares = super().unmask_and_prepare(self.tamper(UNMASK, requests), setup, ahead)
        self._record(UNMASK, shares)
        return shares

    def _record(self, message_type: str, replies: Any) -> None:
        self.received[message_type] = replies
        if self.report is not None:
            answered = {
                stage: sorted(self.names[r.node_id] for r in got)
                for stage, got in self.received.items()
            }
            partial = self.report.with_suffix(".partial")  # the test never reads half a file
            partial.write_text(json.dumps(answered))
            partial.replace(self.report)


class SwapsKeys(Double):
    """Relays the coordinator's own public keys to ``victim`` in place of ``target``'s: were
    they accepted, the coordinator could open every share the victim seals for the target."""

    victim, target = "alpha", "gamma"
    mine = crypto.generate_private_key()

    def tamper(self, message_type: str, outbox: dict[int, Any]) -> dict[int, Any]:
        if message_type != SHARE_KEYS:
            return outbox
        node = {name: i for i, name in self.names.items()}  # protocol ids, drawn per round
        victim, target = node[self.victim], node[self.target]
        to_victim: NeighbourKeys = outbox[victim]
        swapped = (crypto.public_bytes(self.mine), crypto.public_bytes(self.mine))
        return {**outbox, victim: replace(to_victim, keys={**to_victim.keys, target: swapped})}


class SplitsTheSurvivors(Double):
    """Tells the last node's neighbours at odd positions it survived (they would reveal its
    self-mask seed) and the others that it dropped (they would reveal its mask key): with both
    halves the coordinator would unmask its input. ``relays`` "matching" passes each node only
    the confirmations signed over the sets it was shown; "all" passes every one."""

    relays = "all"

    def tamper(self, message_type: str, outbox: dict[int, Any]) -> dict[int, Any]:
        if message_type == CONFIRM:
            ids = sorted(outbox)
            alive = ConfirmRequest(outbox[ids[0]].round_id, ids, [])
            gone = ConfirmRequest(alive.round_id, ids[:-1], ids[-1:])
            self.views = {
                i: gone if k % 2 == 0 and i != ids[-1] else alive for k, i in enumerate(ids)
            }
            return dict(self.views)
        if message_type == UNMASK:
            signed = {c.node_id: c.signature for c in self.received[CONFIRM]}
            return {
                i: UnmaskRequest(
                    view.round_id,
                    view.survivors,
                    view.dropped,
                    {
                        j: s
                        for j, s in signed.items()
                        if self.relays == "all" or self.views[j] == view
                    },
                )
                for i, view in self.views.items()
            }
        return outbox


DOUBLES: dict[str, type[Double]] = {"swap-key": SwapsKeys, "split-survivors": SplitsTheSurvivors}


def install(setting: str | None = None) -> None:
    """Make this process's round loop use the double ``DOUBLE_ENV`` names (a deployed
    coordinator's ServerApp: the loop looks the driver up in its module at each round)."""
    from fedaiot.rounds import loop

    kind, _, report = (setting or os.environ[DOUBLE_ENV]).partition(":")
    double = DOUBLES[kind]
    double.report = Path(report) if report else None
    loop.SecureAggregation = double  # type: ignore[misc]
