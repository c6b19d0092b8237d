"""Run a campaign and register its candidate: signed, in the service's registry, not served.

The campaign trains as any simulated run (``fedaiot simulate``'s engine, the same coordinator
and nodes) or, deployed, as a run of the coordinator's kit on the institutions' own nodes
(``fedaiot.deploy.coordinator_kit``): each node trains on the records of its cohorts that can
still pay (records it has never used bring a fresh budget, the ones it trained on before keep
their spend), and a node with nothing left to spend refuses. The run's own registry keeps
every round; the service's registry receives one version, the last round's (no choice on the
test set, which is the gate's), with its lineage. A campaign in which no round aggregated an
update registers nothing and fails: ``PrivacyBudgetError`` when every node refused on its
budget, else ``NothingLearnedError``. Both outcomes go to the service's audit log.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedaiot.campaigns.spec import CampaignSpec, campaign_config, resolve_base
from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.errors import FlowerRuntimeError, NothingLearnedError, PrivacyBudgetError
from fedaiot.registry.store import Manifest, ModelRegistry

CANDIDATE = "candidate"  # the registry ref naming the newest campaign's version


@dataclass
class CampaignResult:
    name: str
    base: str | None
    version: str
    rounds: int
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    nodes: list[dict[str, Any]]  # per node: trained and refused rounds, its cohorts' spends
    output: Path
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "registered",
            "campaign": self.name,
            "base": self.base,
            "version": self.version,
            "rounds": self.rounds,
            "accuracy": self.metrics.get("accuracy", math.nan),
            "base_accuracy": self.base_metrics.get("accuracy", math.nan),
            "metrics": self.metrics,
            "nodes": self.nodes,
            "output_dir": str(self.output),
            "wall_seconds": self.seconds,
        }


def run_campaign(
    spec: CampaignSpec,
    key: Ed25519PrivateKey,
    *,
    audit_db: Path | None = None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> CampaignResult:
    """Train the campaign, register its candidate; raises (and registers nothing) otherwise."""
    from fedaiot.simulation.engine import preflight

    started = time.perf_counter()
    base = resolve_base(spec, key.public_key())
    cfg, nodes, name = campaign_config(spec, base)
    registry = ModelRegistry(spec.registry, signing_key=key)
    if any(v.rsplit("-r", 1)[0] == name for v in registry.versions()):
        raise ConfigError(f"campaign {name} has a version in {spec.registry} already")
    audit = _Audit(audit_db or spec.registry / "audit.sqlite3", name)
    try:
        if spec.deployment is None:
            preflight(cfg, nodes)
        _reuse_study_statistics(cfg, base)
        summary = _train(cfg, nodes, spec, on_event)
        views = node_views(cfg, summary, nodes, deployed=spec.deployment is not None)
        if int(summary.get("aggregated_rounds", 0)) == 0:
            raise _nothing_learned(name, summary, views)
        candidate = _register(registry, cfg, name, base, spec)
        result = CampaignResult(
            name, base.version if base else None, candidate.version, int(summary["rounds"]),
            candidate.metrics, base.metrics if base else {}, views, cfg.output_path,
            time.perf_counter() - started, summary,
        )  # fmt: skip
        audit.write(candidate.version, 201, "campaign_candidate", describe(result))
    except (ConfigError, PrivacyBudgetError, NothingLearnedError, FlowerRuntimeError) as exc:
        audit.write(None, 409, "campaign_failed", f"campaign {name}: {exc}")
        raise
    finally:
        audit.close()
    return result


def _train(
    cfg: RunConfig, nodes: int, spec: CampaignSpec, on_event: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    if spec.deployment is not None:
        from fedaiot.deploy.coordinator_kit import run_deployed

        def say(line: str) -> None:  # the kit's progress; stdout is the campaign's result
            print(f"coordinator: {line}", file=sys.stderr, flush=True)

        target = spec.deployment
        outcome = run_deployed(
            target.pki, target.state, cfg.to_run_config(), bundle=target.bundle,
            approvals=target.approvals,
            host=target.host, port=target.port, say=say, on_event=on_event,
        )  # fmt: skip
    elif spec.engine == "inprocess":  # the same coordinator and node code, without Ray
        from fedaiot.simulation.inprocess import run_inprocess

        return dict(run_inprocess(cfg, nodes))
    else:
        from fedaiot.simulation.engine import simulate

        outcome = simulate(cfg, nodes, on_event=on_event)
    if outcome.status == "failed":
        raise FlowerRuntimeError(f"the campaign's run failed: {outcome.error} ({outcome.log})")
    return dict(outcome.summary)


def _nothing_learned(
    name: str, summary: dict[str, Any], views: list[dict[str, Any]]
) -> PrivacyBudgetError | NothingLearnedError:
    refused = [v["node"] for v in views if v["refused"] and not v["trained"]]
    if summary.get("status") == "budget-exhausted" or len(refused) == len(views):
        return PrivacyBudgetError(
            f"campaign {name}: every node refused to train (budgets spent, no new records): "
            "nothing was registered"
        )
    error = summary.get("error") or "no round aggregated any update"
    return NothingLearnedError(f"campaign {name}: {error}: nothing was registered")


def _reuse_study_statistics(cfg: RunConfig, base: Manifest | None) -> None:
    """A study's candidate encodes inputs with its base's statistics: the service compares the
    two on the same requests, and the nodes release no statistics a second time."""
    if not cfg.study or base is None or "statistics" not in base.input_schema:
        return
    from fedaiot.rounds.study_phases import STATISTICS_FILE
    from fedaiot.studies.encoding import Statistics

    statistics = Statistics.model_validate(base.input_schema["statistics"])
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    (cfg.output_path / STATISTICS_FILE).write_text(statistics.model_dump_json(indent=1))


def _register(
    registry: ModelRegistry, cfg: RunConfig, name: str, base: Manifest | None, spec: CampaignSpec
) -> Manifest:
    run_registry = ModelRegistry(cfg.output_path / "registry")
    last = run_registry.versions(run=name)[-1]
    weights, manifest = run_registry.load(last)
    lineage = {
        "campaign": name,
        "base": base.version if base else None,
        "run_registry": str(run_registry.root),
        "engine": spec.engine,
    }
    candidate = registry.register(weights, manifest.model_copy(update={"lineage": lineage}))
    registry.set_refs(latest=candidate.version, **{CANDIDATE: candidate.version})
    return candidate


def node_views(
    cfg: RunConfig, summary: dict[str, Any], nodes: int, *, deployed: bool = False
) -> list[dict[str, Any]]:
    """Each node's part in the campaign (rounds trained, refused) and its cohorts' spends (a
    deployed institution's cohorts are in its own ledger, on its own machine)."""
    from fedaiot.node.deployed import default_ledger_dir, simulated_node_file
    from fedaiot.node.round import simulated_ledger_dir
    from fedaiot.privacy.cohorts import cohort_spends
    from fedaiot.rounds.journal import Journal

    events, _ = Journal(cfg.output_path).events()
    replied = [r for e in events if e["event"] == "round" for r in e["replies"]]
    if deployed:
        return [
            {
                "node": node,
                "trained": sum(r["status"] == "trained" for r in replied if r["node"] == node),
                "refused": sum(r["status"] == "refused" for r in replied if r["node"] == node),
                "cohorts": [],
            }
            for node in sorted({r["node"] for r in replied})
        ]
    views = []
    for index in range(nodes):
        node = f"node-{index}"
        replies = [r for r in replied if r["node"] == node]
        folder = simulated_ledger_dir(cfg, index)
        if cfg.node_data and not cfg.ledger_root:
            folder = default_ledger_dir(simulated_node_file(Path(cfg.node_data), index))
        views.append({
            "node": node,
            "trained": sum(r["status"] == "trained" for r in replies),
            "refused": sum(r["status"] == "refused" for r in replies),
            "cohorts": cohort_spends(folder, cfg.delta) if folder.exists() else [],
        })  # fmt: skip
    return views


def describe(result: CampaignResult) -> str:
    accuracy = result.metrics.get("accuracy", math.nan)
    before = result.base_metrics.get("accuracy", math.nan)
    trained = sum(1 for v in result.nodes if v["trained"])
    refused = sum(1 for v in result.nodes if v["refused"] and not v["trained"])
    return (
        f"campaign {result.name} from {result.base or 'a fresh model'}: candidate "
        f"{result.version} after {result.rounds} rounds, accuracy {accuracy:.4f} (base "
        f"{before:.4f}); {trained} nodes trained, {refused} refused"
    )


class _Audit:
    """The campaign's rows in the service's audit log (the same SQLite file, WAL mode)."""

    def __init__(self, path: Path, name: str) -> None:
        from fedaiot.serving.audit import AuditLog

        self.log = AuditLog(Path(str(path).removeprefix("sqlite:///")))
        self.name = name
        self.started = time.perf_counter()

    def write(self, version: str | None, status: int, reason: str, note: str) -> None:
        from fedaiot.serving.audit import make_record

        self.log.record(
            make_record(
                request_id=f"campaign-{uuid.uuid4().hex[:12]}",
                method="CLI",
                endpoint="(campaign)",
                status=status,
                duration_ms=(time.perf_counter() - self.started) * 1000,
                subject="coordinator",
                model_version=version,
                reason=reason,
                note=note[:2000],
            )
        )

    def close(self) -> None:
        self.log.close()
