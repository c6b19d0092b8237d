"""What a simulated study's model does on every site's held-out rows, measured exactly.

In a simulation the researcher holds every site's rows, so beside the federated evaluation (what
a real coordinator gets: DP-noised counts) the final model can be measured exactly on the same
held-out rows the nodes kept, pooled and per site, and compared with what pooling the training
rows would have given: scikit-learn's logistic regression (non-private) and DP-SGD at the same
epsilon. None of this exists in a deployment: no party there holds the pooled rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedaiot.config.run import RunConfig
from fedaiot.node.study_round import StudyData, simulated_sites, simulated_table
from fedaiot.registry.store import ModelRegistry
from fedaiot.studies.encoding import Encoder, Statistics, contributions, statistics_from_sums
from fedaiot.studies.spec import load_study
from fedaiot.studies.task import study_task
from fedaiot.tasks.base import ArrayData
from fedaiot.tasks.evaluation import evaluate


def _pooled(parts: list[ArrayData]) -> ArrayData:
    return ArrayData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def exact_metrics(cfg: RunConfig) -> dict[str, Any]:
    """The run's last registered model on every site's test rows (pooled, and each site's)."""
    study = load_study(Path(cfg.study))
    task = study_task(study)
    registry = ModelRegistry(cfg.output_path / "registry")
    versions = registry.versions(run=cfg.output_path.name)
    statistics_file = cfg.output_path / "statistics.json"
    if not versions or not statistics_file.exists():
        return {}
    statistics = Statistics.model_validate_json(statistics_file.read_text())
    weights, _ = registry.load(versions[-1])
    model = task.build_model()
    model.load_state_dict(weights)
    sites = simulated_sites(cfg)
    tests = []
    per_site = {}
    for index, site in enumerate(sites):
        data = StudyData.of(simulated_table(cfg, study, index), cfg.holdout)
        test = data.encoded(data.test, statistics)
        tests.append(test)
        per_site[site] = _rounded(evaluate(model, test, positive_class=task.positive_class))
    pooled = evaluate(model, _pooled(tests), positive_class=task.positive_class)
    return {"version": versions[-1], "pooled": _rounded(pooled), "sites": per_site}


def pooled_baselines(cfg: RunConfig) -> dict[str, Any]:
    """Pooling every site's training rows: logistic regression (non-private) and, for a
    private run, DP-SGD at the run's epsilon, both on the same test rows as the nodes'."""
    from sklearn.linear_model import LogisticRegression

    study = load_study(Path(cfg.study))
    task = study_task(study)
    sites = range(len(simulated_sites(cfg)))
    datas = [StudyData.of(simulated_table(cfg, study, i), cfg.holdout) for i in sites]
    statistics = statistics_from_sums(
        study, np.sum([contributions(d.train) for d in datas], axis=0)
    )
    encoder = Encoder(study, statistics)
    train = _pooled([ArrayData(encoder.encode(d.train), d.train.labels) for d in datas])
    test = _pooled([ArrayData(encoder.encode(d.test), d.test.labels) for d in datas])
    regression = LogisticRegression(max_iter=2000).fit(train.x, train.y)
    out: dict[str, Any] = {
        "pooled_logistic_regression": {
            "accuracy": round(float(regression.score(test.x, test.y)), 4)
        }
    }
    if cfg.private:
        from fedaiot.experiments.central import fit
        from fedaiot.node.training import LocalSchedule

        model = task.build_model()
        schedule = LocalSchedule(epochs=30, batch_size=64, learning_rate=cfg.learning_rate)
        fit(
            model,
            train,
            schedule,
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed,
        )
        metrics = evaluate(model, test, positive_class=task.positive_class)
        out["pooled_dp_sgd"] = _rounded(metrics)
    return out


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items() if math.isfinite(v)}
