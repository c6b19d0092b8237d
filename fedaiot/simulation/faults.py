"""Simulated faults: nodes that drop out of a round or answer late.

Researchers use them to see, before deploying, how accuracy and privacy spend behave when real
institutions are unreliable. Draws are deterministic in (seed, node, round), so a scenario
replays identically and a resumed run meets the same faults. Every rate defaults to 0; a real
deployment never sets them.
"""

from __future__ import annotations

import hashlib
import time

from fedaiot.config.run import RunConfig
from fedaiot.errors import FedaiotError


class SimulatedDropout(FedaiotError, RuntimeError):
    """The node plays an institution that went offline for this round."""

    reason = "dropped-out"  # the code a node sends on the wire instead of the text


class MissedDeadline(FedaiotError, RuntimeError):
    """The node plays an institution whose update arrived after the round closed."""

    reason = "missed-deadline"


def _uniform(cfg: RunConfig, node: str, server_round: int, fault: str) -> float:
    digest = hashlib.sha256(f"{cfg.seed}:{node}:{server_round}:{fault}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def drops_out(cfg: RunConfig, node: str, server_round: int) -> bool:
    return _uniform(cfg, node, server_round, "drop") < cfg.fault_drop_rate


def straggles(cfg: RunConfig, node: str, server_round: int) -> bool:
    return _uniform(cfg, node, server_round, "straggle") < cfg.fault_straggler_rate


def before_training(cfg: RunConfig, node: str, server_round: int) -> None:
    """Drop out, or wait as a straggler that still makes the round's deadline."""
    if drops_out(cfg, node, server_round):
        raise SimulatedDropout(f"{node} dropped out of round {server_round} (simulated)")
    if straggles(cfg, node, server_round) and cfg.fault_straggler_delay < cfg.round_timeout:
        time.sleep(cfg.fault_straggler_delay)


def after_training(cfg: RunConfig, node: str, server_round: int) -> None:
    """A straggler past the deadline: it trained (and spent budget), but its reply is late.

    The coordinator discards replies that arrive after ``round-timeout``. Sleeping past the
    deadline in Flower's simulation would hold one of its few workers and delay healthy nodes
    queued behind it, which real institutions do not suffer; so the late reply is played as
    what the coordinator makes of it: an update that does not count.
    """
    if straggles(cfg, node, server_round) and cfg.fault_straggler_delay >= cfg.round_timeout:
        raise MissedDeadline(
            f"{node} answered round {server_round} after the {cfg.round_timeout:g} s deadline "
            "(simulated)"
        )
