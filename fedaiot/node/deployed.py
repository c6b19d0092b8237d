"""A deployed node's round: the institution's own files, its own ledger, its own budget cap.

The SuperNode's ``--node-config`` (a TOML file written by ``fedaiot node start``) names the
data; the ClientApp hands it here instead of drawing a simulated partition. Flower-free.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.node.local_data import load_local
from fedaiot.node.round import train_round
from fedaiot.node.training import StateDict
from fedaiot.privacy.cohorts import open_cohorts
from fedaiot.tasks import ArrayData, Task, get_task
from fedaiot.tasks.partition import standardize
from fedaiot.wire.replies import NodeReply, describe

DATA_PATH, NODE_NAME, TASK, LEDGER_DIR, MAX_EPSILON = (
    "data-path",
    "node-name",
    "task",
    "ledger-dir",
    "max-epsilon",
)
STUDY = "study"
REPLY_EVERY = "reply-every"
MAX_REPLY_EVERY = 3600.0


LOG = logging.getLogger("fedaiot.node.round")


class NodeConfigError(BadInputError):
    """The node's own configuration is incomplete, or does not fit the run it is asked into."""

    reason = "config-error"  # the code a node sends on the wire instead of the text


def default_ledger_dir(data_path: Path) -> Path:
    """Next to the data: the budget lives, moves and is backed up with what it protects."""
    data_path = Path(data_path).expanduser().resolve()
    return (data_path if data_path.is_dir() else data_path.parent) / ".fedaiot"


@dataclass(frozen=True)
class NodeSettings:
    data_path: Path
    node_name: str
    task: str
    ledger_dir: Path
    max_epsilon: float | None = None  # the institution's own lifetime cap (None: the run's)
    study: Path | None = None  # the study file the institution holds (its own copy)
    # Replies held to a multiple of this many seconds after the request (None: sent at once):
    # how long training took grows with the record count, and the coordinator sees when a
    # reply comes (docs/privacy.md).
    reply_every: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        missing = [k for k in (DATA_PATH, NODE_NAME, TASK) if k not in node_config]
        if missing:
            raise NodeConfigError(f"node config lacks {', '.join(missing)}")
        data = Path(str(node_config[DATA_PATH])).expanduser()
        ledger = node_config.get(LEDGER_DIR)
        cap = node_config.get(MAX_EPSILON)
        study = node_config.get(STUDY)
        every = node_config.get(REPLY_EVERY)
        return cls(
            data_path=data,
            node_name=str(node_config[NODE_NAME]),
            task=str(node_config[TASK]),
            ledger_dir=Path(str(ledger)).expanduser() if ledger else default_ledger_dir(data),
            max_epsilon=float(cap) if cap is not None and float(cap) > 0 else None,
            study=Path(str(study)).expanduser() if study else None,
            reply_every=check_reply_every(float(every)) if every is not None else None,
        )

    def to_node_config(self) -> dict[str, str | float]:
        config: dict[str, str | float] = {
            DATA_PATH: str(self.data_path),
            NODE_NAME: self.node_name,
            TASK: self.task,
            LEDGER_DIR: str(self.ledger_dir),
        }
        if self.max_epsilon is not None:
            config[MAX_EPSILON] = self.max_epsilon
        if self.study is not None:
            config[STUDY] = str(self.study)
        if self.reply_every is not None:
            config[REPLY_EVERY] = self.reply_every
        return config


def check_reply_every(seconds: float) -> float:
    if not 0 < seconds <= MAX_REPLY_EVERY:
        raise NodeConfigError(
            f"reply-every must be more than 0 and at most {MAX_REPLY_EVERY:.0f} seconds, "
            f"got {seconds}"
        )
    return seconds


DATA_NAMES = ("data.csv", "data.parquet", "data.npz", "data")


def simulated_node_file(node_data: Path, partition_id: int) -> Path:
    """Simulated node ``partition_id``'s own file in a ``node-data`` folder (the layout of
    ``fedaiot node demo-data``: ``node-<i>/data.csv``, ``.parquet``, ``.npz`` or ``data/``)."""
    folder = Path(node_data).expanduser() / f"node-{partition_id}"
    for name in DATA_NAMES:
        if (folder / name).exists():
            return folder / name
    raise NodeConfigError(
        f"node-data: simulated node {partition_id} has no file: expected one of "
        f"{', '.join(str(folder / n) for n in DATA_NAMES)}"
    )


def normalization_from(config: Mapping[str, Any], size: int) -> dict[str, list[float]] | None:
    """The coordinator's standardization statistics from a round's config, checked."""
    if "normalization-mean" not in config:
        return None
    stats = {key: [float(v) for v in config[f"normalization-{key}"]] for key in ("mean", "std")}
    for key, values in stats.items():
        if len(values) != size or not all(math.isfinite(v) for v in values):
            raise NodeConfigError(
                f"the coordinator's normalization {key} has {len(values)} values, "
                f"this task's data has {size} features or channels"
            )
    if any(v <= 0 for v in stats["std"]):
        raise NodeConfigError("the coordinator's normalization std holds a value <= 0")
    return stats


class SeededNoiseRefused(NodeConfigError):
    """The run asks for noise from a known seed: never on an institution's real data."""

    reason = "seeded-noise-refused"


def refuse_seeded_noise(cfg: RunConfig) -> None:
    if cfg.seeded_noise and cfg.private:
        raise SeededNoiseRefused(
            "the run asks for seeded-noise (noise anyone who knows the seed can recompute): "
            "a deployed node trains only with noise from its own secure generator"
        )


def local_records(task: Task, path: Path) -> ArrayData:
    """The institution's raw records, read once per version of the file in a process (the
    kit's runner reads them before it forks a child per message)."""
    from fedaiot.node.warm import once

    return once(f"records:{task.name}", path, lambda: load_local(task, path))


def deployed_round(
    cfg: RunConfig,
    settings: NodeSettings,
    config: Mapping[str, Any],
    global_state: StateDict,
    *,
    released_on_return: bool = True,
    survivors: int | None = None,
    node: str = "",
) -> NodeReply:
    """One round on the institution's files (refused when the run is for another task).

    A deployed reply names no node (``node`` is ""): the coordinator knows the institution by
    the key the SuperLink authenticated, and the name the kit was started under stays in the
    node's own log. A simulated node reading its file (``node-data``) names its partition.
    """
    refuse_seeded_noise(cfg)
    if cfg.task != settings.task:
        raise NodeConfigError(
            f"{settings.node_name} holds {settings.task} data, the run is for task {cfg.task}"
        )
    task = get_task(settings.task)
    raw = local_records(task, settings.data_path)
    stats = normalization_from(config, task.input_shape[0])
    if task.normalize and stats is None:
        raise NodeConfigError(
            f"task {task.name} standardizes its inputs, the coordinator sent no statistics"
        )
    data = standardize(raw, stats) if stats is not None else raw
    common = {
        "node": node,
        "data": data,
        "global_state": global_state,
        "server_round": int(config["server-round"]),
        "run_key": str(config["run-key"]),
        "ledger_dir": settings.ledger_dir,
        # the ledgers know the institution's records as they are in its files
        "cohorts": open_cohorts(settings.ledger_dir, raw),
        "epsilon_cap": settings.max_epsilon,
    }
    if cfg.dp_mode == "distributed" and survivors is not None:
        from fedaiot.node.gradient_share import gradient_share

        reply = gradient_share(cfg, survivors=survivors, task=task, **common)  # type: ignore[arg-type]
    else:
        reply = train_round(
            cfg,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            released_on_return=released_on_return,
            **common,  # type: ignore[arg-type]
        )
    LOG.info(
        "fedaiot node %s, round %s: %s", settings.node_name, config["server-round"], describe(reply)
    )
    return reply
