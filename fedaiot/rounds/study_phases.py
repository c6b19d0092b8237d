"""A study's coordinator holds no data: the nodes compute the inputs' statistics and the
model's evaluation together, and the coordinator sees only sums.

Before round 1 every connected node releases its noisy contribution to the feature statistics
(``fedaiot.node.study_round``); the coordinator sums them (through secure aggregation unless it
is off), turns the sum into means, standard deviations and frequencies, keeps them in
``statistics.json`` (a resumed run reuses them: nothing is released twice) and sends them with
every round. Every ``evaluation.every`` rounds, and after the last, the nodes count the global
model's predictions on their local test splits, with noise; the summed counts give accuracy,
sensitivity, specificity and AUC, which are what the registry's ``best`` is chosen by.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedaiot.config.run import RunConfig
from fedaiot.errors import NothingLearnedError
from fedaiot.secure_rounds.driver import SecureAggregation
from fedaiot.secure_rounds.keys import KeyChain
from fedaiot.studies.encoding import (
    Encoder,
    Statistics,
    contribution_length,
    sensitivity,
    statistics_from_sums,
)
from fedaiot.studies.spec import Study
from fedaiot.studies.task import study_task
from fedaiot.tasks.evaluation import counts_length, metrics_from_counts
from fedaiot.wire.records import ReceivedReply, read_reply, read_vector, refuse_duplicates
from fedaiot.wire.replies import CONTRIBUTED
from fedaiot.wire.requests import EVALUATIONS, PURPOSE, STUDY_KEY

STATISTICS_FILE = "statistics.json"


def evaluation_rounds(study: Study, rounds: int) -> list[int]:
    """The rounds after which the nodes evaluate: every k-th, and the last."""
    every = study.evaluation.every
    return sorted({*range(every, rounds + 1, every), rounds})


class FederatedInputs:
    def __init__(
        self,
        cfg: RunConfig,
        study: Study,
        roster: dict[int, str],
        run_key: str,
        chain: KeyChain | None = None,
    ) -> None:
        self.cfg, self.study, self.roster, self.run_key = cfg, study, roster, run_key
        self.chain = chain if chain is not None else KeyChain()
        self.task = study_task(study)
        self.statistics: Statistics | None = None
        self.file = cfg.output_path / STATISTICS_FILE
        self.evaluated = evaluation_rounds(study, cfg.num_rounds)
        self.max_weight = float(study.quality.max_examples)

    def prepare(self, grid: Grid) -> dict[str, Any]:
        if self.file.exists():  # a resumed run: the statistics were released already
            self.statistics = Statistics.model_validate_json(self.file.read_text())
            return {"statistics": "reused"}
        config = ConfigRecord({PURPOSE: "statistics"})
        total, notes = self._vector_round(grid, config, None, contribution_length(self.study))
        if total is None:
            refused = [r for r in notes["replies"] if r["status"] == "refused"]
            why = (
                f"{len(refused)} of {len(notes['replies'])} nodes refused to release them "
                f"({refused[0]['problem']}): the budget cannot pay statistics-noise "
                f"{self.cfg.statistics_noise:g}"
                if refused
                else notes.get("error", "")
            )
            raise NothingLearnedError(f"the nodes' feature statistics could not be summed: {why}")
        contributors = int(notes.get("contributors", 1))
        noise = self.cfg.statistics_noise * sensitivity(self.study) if self.cfg.private else 0.0
        self.statistics = statistics_from_sums(self.study, total, noise * math.sqrt(contributors))
        tmp = Path(f"{self.file}.tmp")
        tmp.write_text(self.statistics.model_dump_json(indent=1))
        tmp.replace(self.file)
        return notes

    def round_config(self) -> dict[str, Any]:
        assert self.statistics is not None, "prepare() first"
        return {STUDY_KEY: self.study.key, **self.statistics.to_record()}

    def input_schema(self) -> dict[str, Any]:
        schema = self.task.input_schema({})
        schema["study"] = self.study.model_dump(mode="json")
        if self.statistics is not None:
            schema["statistics"] = self.statistics.model_dump(mode="json")
        schema["columns"] = Encoder.columns(self.study)
        return schema

    def evaluate(
        self, grid: Grid, arrays: ArrayRecord, server_round: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        if server_round not in self.evaluated:
            return {}, {}
        config = ConfigRecord(
            {PURPOSE: "evaluation", "server-round": server_round, EVALUATIONS: len(self.evaluated)}
        )
        length = counts_length(self.task.num_classes)
        total, notes = self._vector_round(grid, config, arrays, length)
        if total is None:
            return {}, {"evaluation": notes}
        metrics = metrics_from_counts(total, self.task.num_classes)
        return {k: v for k, v in metrics.items() if math.isfinite(v)}, {"evaluation": notes}

    def _vector_round(
        self, grid: Grid, config: ConfigRecord, arrays: ArrayRecord | None, length: int
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Every connected node's vector, summed; None (and why) when no sum could be made."""
        sample_nodes(grid, self.cfg.min_available_nodes, self.cfg.min_available_nodes)
        node_ids = sorted(grid.get_node_ids())
        for key, value in {"run-key": self.run_key, **self.round_config_or_empty()}.items():
            config[key] = value
        content = RecordDict({"config": config})
        if arrays is not None:
            content["arrays"] = arrays
        if self.cfg.secure_aggregation:
            secure = SecureAggregation(self.cfg, grid, self.roster, self.chain).sum_vectors(
                node_ids, content, length
            )
            notes = _notes(secure.replies, error=secure.error, dropped=secure.dropped)
            notes["contributors"] = 0 if secure.error else round(secure.total_weight)
            return (secure.vector if secure.error == "" else None), notes
        messages = [
            Message(content, dst_node_id=fid, message_type="query.vector") for fid in node_ids
        ]
        received = list(grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        replies = refuse_duplicates([read_reply(m, self.roster) for m in received])
        vectors, problems = [], {}
        for message, reply in zip(received, replies, strict=True):
            if reply.status != CONTRIBUTED or reply.message is None:
                continue
            vector = read_vector(message, length)
            if isinstance(vector, str):
                problems[reply.node] = vector
            else:
                vectors.append(vector)
        notes = _notes(replies, error="" if vectors else "no node contributed", dropped=problems)
        notes["contributors"] = len(vectors)
        return (np.sum(vectors, axis=0) if vectors else None), notes

    def round_config_or_empty(self) -> dict[str, Any]:
        return self.round_config() if self.statistics is not None else {STUDY_KEY: self.study.key}


def _notes(replies: list[ReceivedReply], *, error: str, dropped: dict[str, str]) -> dict[str, Any]:
    return {
        "error": error,
        "dropped": dropped,
        "replies": [{"node": r.node, "status": r.status, "problem": r.problem} for r in replies],
        "epsilon": {r.node: r.metrics.get("epsilon") for r in replies if r.metrics},
    }
