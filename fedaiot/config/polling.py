"""How often deployed processes look for work: the waits that set a deployed round's pace.

Flower 1.41 hard-codes most of them (a SuperNode asks the SuperLink for a message every 3 s when
it has none; a ServerApp asks for replies every 3 s). The kits' launchers replace them at process
start (``fedaiot.launch.flower_patches``); these settings say with what. Each process reads them
from one environment variable, so that Flower's own children (the ServerApp the SuperLink
starts, the ClientApp runners) see the same values as the kit that started them.

Figures (idle CPU, latency) beside each default are in docs/deployment.md.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedaiot.errors import BadInputError

ENV = "FEDAIOT_POLLING"
STOCK = "stock"


class PollingError(BadInputError):
    """A polling setting out of range; the message names it."""


class Polling(BaseModel):
    """Seconds between looks, on each side of a deployed round. ``mode = "stock"`` leaves every
    wait as Flower ships it (and starts a ClientApp process per message): the baseline the
    benchmark compares against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["fast", "stock"] = "fast"
    # SuperNode: ask the SuperLink for a message when the last ask found none (Flower: 3 s).
    # The dominant idle cost: one HTTPS request to the SuperLink per interval.
    fleet: float = Field(0.1, ge=0.01, le=60)
    # SuperNode: look for its ClientApp's reply, and for the reply's objects (Flower: 0.5 s).
    # Only while a message is being handled; an in-memory look, no request.
    reply: float = Field(0.01, ge=0.001, le=60)
    # SuperExec: ask the SuperNode for a task (Flower: 1 s, FLWR_SUPEREXEC_TASK_POLL_INTERVAL).
    # The kit's runner is woken by its SuperNode when a message arrives and asks at once; this
    # is its fallback, and the interval of the SuperLink's own SuperExec (the ServerApp start).
    task: float = Field(0.5, ge=0.01, le=60)
    # First retry of an object pull whose object is not there yet (Flower: 1 s, doubling).
    object_retry: float = Field(0.02, ge=0.001, le=60)
    # ServerApp: look for the nodes' replies to an exchange (Flower: 3 s in send_and_receive).
    # One request to the SuperLink per look, only while an exchange waits. Not shorter: at
    # 0.01 s it asks a hundred times a second, and the SuperLink that answers it also serves
    # every node's polls on the same cores.
    results: float = Field(0.05, ge=0.001, le=60)

    @property
    def stock(self) -> bool:
        return self.mode == STOCK

    def to_env(self) -> dict[str, str]:
        """The environment that hands these settings to every process below the kit."""
        env = {ENV: self.model_dump_json()}
        if not self.stock:  # Flower's supported knob for the SuperExec's AcquireTask loop
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = repr(self.task)
        return env

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Polling:
        """The settings a kit handed down, the defaults when none did."""
        raw = (os.environ if environ is None else environ).get(ENV, "")
        if not raw:
            return cls()
        if raw.strip() == STOCK:
            return cls(mode="stock")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or ENV
            raise PollingError(f"{ENV}: {where}: {first['msg']}") from None
