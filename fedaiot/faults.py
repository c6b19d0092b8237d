"""Simulated faults: nodes that drop out of a round or answer late.

Researchers use them to see, before deploying, how accuracy and privacy spend behave when real
institutions are unreliable. Draws are deterministic in (seed, node, round), so a scenario
replays identically and a resumed run meets the same faults. Every rate defaults to 0; a real
deployment never sets them.
"""

from __future__ import annotations

import hashlib
import time

from fedaiot.config import RunConfig


class SimulatedDropout(RuntimeError):
    """The node plays an institution that went offline for this round."""


def _uniform(cfg: RunConfig, node: str, server_round: int, fault: str) -> float:
    digest = hashlib.sha256(f"{cfg.seed}:{node}:{server_round}:{fault}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def drops_out(cfg: RunConfig, node: str, server_round: int) -> bool:
    return _uniform(cfg, node, server_round, "drop") < cfg.fault_drop_rate


def straggles(cfg: RunConfig, node: str, server_round: int) -> bool:
    return _uniform(cfg, node, server_round, "straggle") < cfg.fault_straggler_rate


def inject(cfg: RunConfig, node: str, server_round: int) -> None:
    """Fail or delay this node's round as the scenario says (before it spends any budget)."""
    if drops_out(cfg, node, server_round):
        raise SimulatedDropout(f"{node} dropped out of round {server_round} (simulated)")
    if straggles(cfg, node, server_round):
        time.sleep(cfg.fault_straggler_delay)
