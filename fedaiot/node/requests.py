"""What a node does with each request, wherever its data comes from.

A node's data is a simulated partition (built-in tasks), a simulated site of a study's table,
or, deployed, the institution's own files (``node.deployed``). The ClientApp hands every
training request to :func:`train` and every release request (a study's statistics or
evaluation) to :func:`release`; both are Flower-free.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedaiot.config.run import RunConfig
from fedaiot.node.deployed import (
    DATA_PATH,
    NodeConfigError,
    NodeSettings,
    default_ledger_dir,
    deployed_round,
    refuse_seeded_noise,
    simulated_node_file,
)
from fedaiot.node.round import simulated_ledger_dir, simulated_partition, train_round
from fedaiot.node.study_round import (
    StudyData,
    check_study,
    evaluation_release,
    simulated_table,
    statistics_release,
)
from fedaiot.studies.encoding import Statistics
from fedaiot.studies.spec import Study, load_study
from fedaiot.studies.table import read_table
from fedaiot.studies.task import study_task
from fedaiot.tasks import get_task
from fedaiot.wire.replies import NodeReply
from fedaiot.wire.requests import EVALUATIONS, PURPOSE

if TYPE_CHECKING:
    from fedaiot.node.training import StateDict


@dataclass(frozen=True)
class Source:
    """Where this node's data and ledger are, and what it is called in reports."""

    node: str  # simulation: its partition ("node-3"); deployed: "" (the coordinator names it)
    ledger_dir: Path
    epsilon_cap: float | None = None
    settings: NodeSettings | None = None  # a deployed institution's
    partition: tuple[int, int] = (0, 1)  # a simulated node's (id, count)

    @classmethod
    def of(cls, cfg: RunConfig, node_config: Mapping[str, Any]) -> Source:
        if DATA_PATH in node_config:
            settings = NodeSettings.from_node_config(node_config)
            return cls("", settings.ledger_dir, settings.max_epsilon, settings)
        pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if cfg.node_data:  # a simulated institution reading its own file, as a deployed one
            path = simulated_node_file(Path(cfg.node_data), pid)
            ledgers = simulated_ledger_dir(cfg, pid) if cfg.ledger_root else None
            ledger_dir = ledgers or default_ledger_dir(path)
            settings = NodeSettings(path, f"node-{pid}", cfg.task, ledger_dir)
            return cls(f"node-{pid}", ledger_dir, None, settings, (pid, count))
        return cls(f"node-{pid}", simulated_ledger_dir(cfg, pid), partition=(pid, count))

    def study(self, cfg: RunConfig) -> Study:
        """The study this node holds: a deployed institution's own copy of the file."""
        if self.settings is not None:
            if self.settings.study is None:
                raise NodeConfigError("the run is a study, this node was started without one")
            return load_study(self.settings.study)
        return load_study(Path(cfg.study))

    def study_data(self, cfg: RunConfig, config: Mapping[str, Any]) -> StudyData:
        study = self.study(cfg)
        check_study(study, config)
        if self.settings is not None:
            refuse_seeded_noise(cfg)
            return study_records(study, self.settings.data_path, cfg.holdout)
        return StudyData.of(simulated_table(cfg, study, self.partition[0]), cfg.holdout)


def study_records(study: Study, path: Path, holdout: str = "test") -> StudyData:
    """The institution's study table and its splits, read once per version of its file in a
    process (the kit's runner reads them before it forks a child per message)."""
    from fedaiot.node.warm import once

    return once(
        f"study:{study.key}:{holdout}", path, lambda: StudyData.of(read_table(study, path), holdout)
    )


def held(source: Source, answer: Callable[[], NodeReply]) -> NodeReply:
    """``answer()``, returned at the next multiple of the institution's ``reply_every`` seconds
    after the call began (at once without one): a coordinator timing replies learns how many
    multiples training took, not how long."""
    started = time.monotonic()
    reply = answer()
    every = source.settings.reply_every if source.settings is not None else None
    if every is not None:
        time.sleep(hold_for(time.monotonic() - started, every))
    return reply


def hold_for(elapsed: float, every: float) -> float:
    """Seconds from ``elapsed`` to the next multiple of ``every`` (the first one at least)."""
    multiples = max(1, math.ceil(elapsed / every))
    return max(0.0, multiples * every - elapsed)


def logged(
    cfg: RunConfig, source: Source, config: Mapping[str, Any], answer: Callable[[], NodeReply]
) -> NodeReply:
    """``answer()``, and on a deployed node a line of its round log (``node.round_log``)."""
    if source.settings is None:
        return answer()
    from fedaiot.node.round_log import record, what_of

    started = time.perf_counter()
    reply = answer()
    cap = source.settings.max_epsilon
    budget = min(cfg.epsilon, cap) if cap is not None else cfg.epsilon
    record(
        source.settings,
        what=what_of(config),
        status=reply.status,
        reason=reply.reason,
        detail=reply.detail,
        epsilon=reply.metrics.get("epsilon"),
        budget=budget if cfg.private else None,
        seconds=time.perf_counter() - started,
    )
    return reply


def train(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    config: Mapping[str, Any],
    global_state: StateDict,
    *,
    released_on_return: bool,
    survivors: int | None = None,
) -> NodeReply:
    """A training round's reply: a (local-DP) update, or in a distributed-DP run this node's
    noisy gradient share, sized for the round's fewest ``survivors``."""
    source = Source.of(cfg, node_config)

    def answer() -> NodeReply:
        return _train(cfg, source, config, global_state, released_on_return, survivors)

    return held(source, lambda: logged(cfg, source, config, answer))


def _train(
    cfg: RunConfig,
    source: Source,
    config: Mapping[str, Any],
    global_state: StateDict,
    released_on_return: bool,
    survivors: int | None,
) -> NodeReply:
    if cfg.dp_mode == "distributed" and survivors is None:
        raise NodeConfigError("a distributed-DP round must come through secure aggregation")
    server_round, run_key = int(config["server-round"]), str(config["run-key"])
    if not cfg.study:
        if source.settings is not None:
            return deployed_round(
                cfg,
                source.settings,
                config,
                global_state,
                released_on_return=released_on_return,
                survivors=survivors,
                node=source.node,
            )
        data, task = simulated_partition(cfg, *source.partition), None
        cohorts, max_weight = None, math.inf
    else:
        study_data = source.study_data(cfg, config)
        statistics = Statistics.from_record(study_data.study, dict(config))
        data = study_data.encoded(study_data.train, statistics)
        cohorts, _ = study_data.cohorts(source.ledger_dir)
        task = study_task(study_data.study)
        max_weight = float(study_data.study.quality.max_examples)
    if cfg.dp_mode == "distributed":
        from fedaiot.node.gradient_share import gradient_share

        assert survivors is not None
        return gradient_share(
            cfg,
            node=source.node,
            data=data,
            global_state=global_state,
            server_round=server_round,
            run_key=run_key,
            ledger_dir=source.ledger_dir,
            survivors=survivors,
            task=task or get_task(cfg.task),
            cohorts=cohorts,
            epsilon_cap=source.epsilon_cap,
        )
    return train_round(
        cfg,
        node=source.node,
        data=data,
        global_state=global_state,
        server_round=server_round,
        run_key=run_key,
        ledger_dir=source.ledger_dir,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        cohorts=cohorts,
        released_on_return=released_on_return,
        epsilon_cap=source.epsilon_cap,
        task=task,
        max_weight=max_weight,
    )


def release(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    config: Mapping[str, Any],
    global_state: StateDict | None,
) -> NodeReply:
    """A study's statistics or evaluation vector, as ``config["purpose"]`` asks."""
    source = Source.of(cfg, node_config)

    def answer() -> NodeReply:
        return _release(cfg, source, config, global_state)

    return held(source, lambda: logged(cfg, source, config, answer))


def _release(
    cfg: RunConfig,
    source: Source,
    config: Mapping[str, Any],
    global_state: StateDict | None,
) -> NodeReply:
    data = source.study_data(cfg, config)
    run_key = str(config["run-key"])
    if config[PURPOSE] == "statistics":
        return statistics_release(
            cfg,
            data,
            node=source.node,
            ledger_dir=source.ledger_dir,
            run_key=run_key,
            epsilon_cap=source.epsilon_cap,
        )
    if global_state is None:
        raise NodeConfigError("an evaluation request carries no model")
    statistics = Statistics.from_record(data.study, dict(config))
    return evaluation_release(
        cfg,
        data,
        statistics,
        global_state,
        server_round=int(config["server-round"]),
        evaluations=int(config[EVALUATIONS]),
        node=source.node,
        ledger_dir=source.ledger_dir,
        run_key=run_key,
        epsilon_cap=source.epsilon_cap,
    )
