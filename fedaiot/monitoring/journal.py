"""What a run's journal says about its nodes: who has been missing, and how much of the
privacy budget each has spent.

The coordinator appends a ``round`` event per round to ``journal.jsonl``
(``fedaiot.rounds.loop``), with ``replies``: each node's ``node``, ``status`` (``trained``,
``refused``, ``failed``, or ``dropped`` when its masked update did not survive secure
aggregation) and ``epsilon`` (its data set's epsilon spent so far). A node *counts* in a round
when it trained or deliberately refused (budget); it is *missing* when it did not reply, or its
reply failed or was dropped. A node is known from its first reply on, so a node that never
replied is not seen. Under ``fraction-train`` < 1 nodes are sampled and skip rounds by design:
the rule is for federations that ask every node every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedaiot.registry.store import ModelRegistry, RegistryError
from fedaiot.rounds.journal import JOURNAL, Journal

COUNTED = frozenset({"trained", "refused"})


def journal_folder(path: Path) -> Path:
    """The run folder of a journal given as the folder or as its ``journal.jsonl``."""
    return path.parent if path.name == JOURNAL else path


def rounds(path: Path) -> list[dict[str, Any]]:
    """The journal's ``round`` events, oldest first (complete lines only)."""
    events, _ = Journal(journal_folder(path)).events()
    return [e for e in events if e.get("event") == "round" and isinstance(e.get("replies"), list)]


@dataclass(frozen=True, slots=True)
class Missing:
    node: str
    rounds: int  # the latest rounds in a row without a counted reply
    last_counted: int | None  # the round of its last counted reply


def missing_nodes(events: list[dict[str, Any]], at_least: int) -> list[Missing]:
    """Nodes whose last ``at_least`` or more rounds had no counted reply."""
    last: dict[str, int | None] = {}
    for event in events:
        for reply in event["replies"]:
            node = str(reply.get("node"))
            last.setdefault(node, None)
            if reply.get("status") in COUNTED:
                last[node] = int(event.get("round", 0))
    played = [int(e.get("round", 0)) for e in events]
    found = []
    for node, counted in sorted(last.items()):
        streak = sum(1 for r in played if counted is None or r > counted)
        if streak >= at_least:
            found.append(Missing(node, streak, counted))
    return found


def epsilons(events: list[dict[str, Any]]) -> dict[str, float]:
    """Each node's latest reported epsilon spent (nodes that reported none are left out)."""
    spent: dict[str, float] = {}
    for event in events:
        for reply in event["replies"]:
            value = reply.get("epsilon")
            if isinstance(value, int | float) and math.isfinite(value):
                spent[str(reply.get("node"))] = float(value)
    return spent


def run_budget(path: Path) -> float | None:
    """The run's epsilon budget per node, from its registry's newest version's configuration
    (None when the run has registered nothing yet, or is not private)."""
    registry = ModelRegistry(journal_folder(path) / "registry")
    try:
        versions = registry.versions()
        if not versions:
            return None
        config = registry.manifest(versions[-1]).config
    except RegistryError:
        return None
    epsilon = config.get("epsilon")
    if not config.get("private", True) or not isinstance(epsilon, int | float):
        return None
    return float(epsilon) if epsilon > 0 else None
