"""A node's part in a study: its table, its held-out test split, and its two releases.

Besides training rounds, a study's node answers two kinds of requests with a vector that is
summed with the other nodes' (through secure aggregation by default):

* **statistics**, once per run before training: the sum over its training records of bounded
  per-record contributions (``fedaiot.studies.encoding``), plus Gaussian noise of
  ``statistics-noise`` times their sensitivity, charged to the training side of its ledger;
* **evaluation**, every k rounds: counts of the global model's predictions on its local test
  split (``fedaiot.tasks.evaluation``), plus Gaussian noise planned so that the run's
  evaluations fit the test side's budget, charged there. The node logs its own exact metrics
  locally: per-site results stay with the site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.node.round import round_randomness
from fedaiot.privacy.accounting import BudgetExhaustedError
from fedaiot.privacy.budget import BudgetTerms
from fedaiot.privacy.cohorts import Cohort, open_cohorts, restrict
from fedaiot.privacy.releases import Release, charge_cohorts, cohort_evaluation_noise
from fedaiot.studies.encoding import Encoder, Statistics, contributions, sensitivity
from fedaiot.studies.spec import Study, StudyError
from fedaiot.studies.table import StudyTable, open_table, read_table
from fedaiot.tasks.base import ArrayData
from fedaiot.wire.replies import CONTRIBUTED, REFUSED, NodeReply
from fedaiot.wire.requests import STUDY_KEY

LOG = logging.getLogger("fedaiot.node")


class StudyMismatch(BadInputError):
    """The node holds another study, or another version of it, than the coordinator runs."""


@dataclass(frozen=True)
class StudyData:
    """A node's table, split into the records it trains on and those it holds out."""

    study: Study
    train: StudyTable
    test: StudyTable
    train_rows: np.ndarray  # the splits' rows in the whole table
    test_rows: np.ndarray
    records: ArrayData  # the whole table, as the ledgers identify its records

    @classmethod
    def of(cls, table: StudyTable, holdout: str = "test") -> StudyData:
        """``holdout = "validation"`` (tuning) sets the test split aside, unused, and holds
        out a validation split of the training rows in its place."""
        held_out = table.test_rows()
        train_rows, test_rows = np.flatnonzero(~held_out), np.flatnonzero(held_out)
        if holdout == "validation":
            validation = table.take(train_rows).test_rows("validation")
            train_rows, test_rows = train_rows[~validation], train_rows[validation]
        records = ArrayData(table.raw().astype(np.float32), table.labels)
        train, test = table.take(train_rows), table.take(test_rows)
        return cls(table.study, train, test, train_rows, test_rows, records)

    def cohorts(self, folder: Path) -> tuple[list[Cohort], list[Cohort]]:
        """The table's cohorts seen from the training split and from the test split."""
        every = open_cohorts(folder, self.records)
        return restrict(every, self.train_rows), restrict(every, self.test_rows)

    def encoded(self, split: StudyTable, statistics: Statistics) -> ArrayData:
        return ArrayData(Encoder(self.study, statistics).encode(split), split.labels)


def simulated_sites(cfg: RunConfig) -> list[str]:
    """The sites of a simulated study, in order: node i holds site i's rows."""
    table = open_table(Path(cfg.study_data))
    if cfg.site_column not in table.column_names:
        raise StudyError(f"{cfg.study_data}: no site column {cfg.site_column!r}")
    return sorted({str(v) for v in table.column(cfg.site_column).to_pylist()})


def simulated_table(cfg: RunConfig, study: Study, partition_id: int) -> StudyTable:
    site = simulated_sites(cfg)[partition_id]
    try:
        return read_table(study, Path(cfg.study_data), site=(cfg.site_column, site))
    except StudyError as exc:
        raise StudyError(f"site {site!r}: {exc}") from None


def check_study(study: Study, config: Mapping[str, Any]) -> None:
    """Refuse a run of another study or version, with one line."""
    theirs = str(config.get(STUDY_KEY, ""))
    if theirs != study.key:
        raise StudyMismatch(
            f"this node holds study {study.key}, the coordinator runs {theirs or 'no study'}: "
            "both sides must use the same study file"
        )


def statistics_release(
    cfg: RunConfig,
    data: StudyData,
    *,
    node: str,
    ledger_dir: Path,
    run_key: str,
    epsilon_cap: float | None = None,
) -> NodeReply:
    """The node's noisy contribution to the run's feature statistics (training records)."""
    if not cfg.private:
        return NodeReply(CONTRIBUTED, node, 1.0, {}, vector=contributions(data.train))
    release = Release("statistics", "train", cfg.statistics_noise)
    terms = BudgetTerms.for_run(cfg, epsilon_cap)
    train_cohorts, _ = data.cohorts(ledger_dir)
    decision = charge_cohorts(train_cohorts, terms, run=run_key, release=release)
    if not decision.granted:
        metrics = {"epsilon": decision.epsilon, "delta": cfg.delta}
        return _refused(node, metrics, decision.reason)
    vector = contributions(data.train.take(decision.rows()))  # the cohorts that could pay
    scale = cfg.statistics_noise * sensitivity(data.study)
    noise = round_randomness(cfg, f"{node}:statistics", 0).normal(len(vector), scale)
    metrics = {"epsilon": decision.epsilon, "delta": cfg.delta}
    return NodeReply(CONTRIBUTED, node, 1.0, metrics, vector=vector + noise)


def evaluation_release(
    cfg: RunConfig,
    data: StudyData,
    statistics: Statistics,
    global_state: dict[str, Any],
    *,
    node: str,
    ledger_dir: Path,
    run_key: str,
    server_round: int,
    evaluations: int,
    epsilon_cap: float | None = None,
) -> NodeReply:
    """The node's noisy counts of the global model's predictions on its held-out split."""
    from fedaiot.studies.task import study_task
    from fedaiot.tasks.evaluation import evaluate, evaluation_counts

    task = study_task(data.study)
    model = task.build_model()
    model.load_state_dict(global_state)
    test = data.encoded(data.test, statistics)
    if len(test):
        local = evaluate(model, test, positive_class=task.positive_class)
        LOG.info("node %s, round %s, its own test split: %s", node, server_round, local)
    if not cfg.private:
        counts = evaluation_counts(model, test, positive_class=task.positive_class)
        return NodeReply(CONTRIBUTED, node, 1.0, {}, vector=counts)
    terms = BudgetTerms.for_run(cfg, epsilon_cap)
    _, test_cohorts = data.cohorts(ledger_dir)
    try:
        sigma = cohort_evaluation_noise(test_cohorts, terms, run=run_key, releases=evaluations)
    except BudgetExhaustedError as exc:
        epsilon = max((c.ledger.epsilon(cfg.delta) for c in test_cohorts), default=0.0)
        return _refused(node, {"epsilon": epsilon, "delta": cfg.delta}, str(exc))
    release = Release("evaluation", "test", sigma)
    decision = charge_cohorts(test_cohorts, terms, run=run_key, release=release)
    metrics = {"epsilon": decision.epsilon, "delta": cfg.delta}
    if not decision.granted:
        return _refused(node, metrics, decision.reason)
    counted = test.take(decision.rows())  # the cohorts that could pay
    counts = evaluation_counts(model, counted, positive_class=task.positive_class)
    noise = round_randomness(cfg, f"{node}:evaluation", server_round).normal(len(counts), sigma)
    return NodeReply(CONTRIBUTED, node, 1.0, metrics, vector=counts + noise)


def _refused(node: str, metrics: dict[str, float], detail: str) -> NodeReply:
    return NodeReply(REFUSED, node, 0.0, metrics, reason="budget-exhausted", detail=detail)
