"""The coordinator's round loop: sample, collect, check, aggregate, evaluate, register.

Flower's strategies choose the nodes and combine the updates (FedAvg, FedProx, FedAdam); this
loop adds what a deployment needs around them: every reply is checked before it can touch the
global model, nodes that refuse on privacy grounds are recorded and skipped, every round's model
goes into the registry, and a restarted coordinator resumes after the last registered round.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedaiot.config.run import ConfigError, RunConfig
from fedaiot.privacy.disclosure import disclosure
from fedaiot.registry.store import Manifest, ModelRegistry, NodePrivacy, version_name
from fedaiot.rounds.exchanges import CountingGrid
from fedaiot.rounds.inputs import CentralInputs, Inputs
from fedaiot.rounds.journal import Journal
from fedaiot.rounds.strategy_state import load_moments, save_moments
from fedaiot.secure_rounds.driver import SecureAggregation, as_strategy_reply, model_length
from fedaiot.secure_rounds.keys import KeyChain
from fedaiot.tasks import Task, get_task
from fedaiot.wire.records import ReceivedReply, receive, refuse_duplicates


def build_strategy(cfg: RunConfig) -> FedAvg:
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 0.0,  # evaluation is central, on the held-out set
        "min_train_nodes": cfg.min_train_nodes,
        "min_available_nodes": cfg.min_available_nodes,
    }
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedavgm":
        return FedAvgM(server_learning_rate=1.0, server_momentum=cfg.server_momentum, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, **common)
    return FedAvg(**common)


@dataclass
class RunState:
    """What the coordinator knows between rounds; rebuilt from the registry on a restart."""

    round: int = 0
    nodes: dict[str, NodePrivacy] = field(default_factory=dict)
    best_accuracy: float = -math.inf
    aggregated: int = 0  # rounds whose aggregate became the global model
    no_aggregate: str = ""  # why the last round without an aggregate had none


def run_key(cfg: RunConfig) -> str:
    return f"{cfg.output_path.name}:{cfg.fingerprint()}"


def resume_point(cfg: RunConfig) -> tuple[dict[str, torch.Tensor], Manifest] | None:
    """The last registered round of the run in ``cfg.output_path``, checked, or None if new.

    Raises RegistryError for a corrupt or tampered version and ConfigError when the folder
    holds a run of another configuration: a run is never continued on the wrong footing.
    """
    run = cfg.output_path.name
    registry = ModelRegistry(cfg.output_path / "registry")
    versions = registry.versions(run=run)
    if not versions:
        return None
    weights, manifest = registry.load(versions[-1])
    if manifest.config.get("fingerprint") != cfg.fingerprint():
        raise ConfigError(
            f"run '{run}' already exists in {cfg.output_path} with a different "
            "configuration: choose another output directory (nothing was overwritten)"
        )
    return weights, manifest


def rounds_done(cfg: RunConfig) -> int:
    """Rounds of this run already played: registered, or journalled without an aggregate."""
    resumed = resume_point(cfg)
    registered = resumed[1].round if resumed else 0
    events, _ = Journal(cfg.output_path).events()
    key = run_key(cfg)
    played = [e["round"] for e in events if e["event"] == "round" and e.get("run_key") == key]
    return max([registered, *played])


class RoundLoop:
    """One run of the coordinator: ``run_rounds(grid)`` plays it to its end (or pause)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run = cfg.output_path.name
        self.run_key = run_key(cfg)
        self.roster = load_roster(cfg.node_roster)
        self.privacy = disclosure(cfg)
        self.registry = ModelRegistry(cfg.output_path / "registry")
        self.journal = Journal(cfg.output_path)
        # keys the nodes advertise one aggregation ahead (with their unmask answers)
        self.chain = KeyChain()
        self.inputs: Inputs
        if cfg.study:
            from fedaiot.rounds.study_phases import FederatedInputs
            from fedaiot.studies.spec import load_study

            study = load_study(Path(cfg.study))
            self.inputs = FederatedInputs(cfg, study, self.roster, self.run_key, self.chain)
            self.task: Task = self.inputs.task
        else:
            self.task = get_task(cfg.task)
            self.inputs = CentralInputs(cfg, self.task)

    def initial_state(self) -> tuple[ArrayRecord, RunState]:
        """The fresh model, or the last registered round of this run (its hash checked)."""
        resumed = resume_point(self.cfg)
        played = rounds_done(self.cfg)
        if resumed is None:
            if self.cfg.init_version:  # a campaign: on from a registered model
                return self.as_model(ArrayRecord(self.initial_weights())), RunState(played)
            torch.manual_seed(self.cfg.seed)
            return ArrayRecord(self.task.build_model().state_dict()), RunState(played)
        weights, manifest = resumed
        versions = self.registry.versions(run=self.run)
        best = max(self.registry.manifest(v).metrics.get("accuracy", -math.inf) for v in versions)
        state = RunState(played, {n.id: n for n in manifest.nodes}, best, len(versions))
        return self.as_model(ArrayRecord(weights)), state  # the model's own key order

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The weights of ``init-version`` (hash-checked), refused for another architecture."""
        registry = ModelRegistry(Path(self.cfg.init_registry).expanduser())
        weights, manifest = registry.load(self.cfg.init_version)
        if (manifest.task, manifest.architecture) != (self.task.name, self.task.architecture):
            raise ConfigError(
                f"init-version {manifest.version} is a {manifest.task} model "
                f"({manifest.architecture}): this run trains {self.task.name} "
                f"({self.task.architecture})"
            )
        return weights

    def run_rounds(self, grid: Grid) -> dict[str, Any]:
        # a bare grid (the in-process one) carries tensors packed, as a deployment does
        grid = grid if isinstance(grid, CountingGrid) else CountingGrid(grid, pack=True)
        arrays, state = self.initial_state()
        strategy = build_strategy(self.cfg)
        moments = self.cfg.output_path / "strategy.safetensors"
        restored = state.round > 0 and load_moments(strategy, moments, state.round)
        self.journal.append(
            "start",
            run=self.run,
            rounds=self.cfg.num_rounds,
            resumed_after=state.round,
            strategy_state_restored=restored,
        )
        status = "completed"
        if state.round < self.cfg.num_rounds:
            self.chain.upcoming = model_length(arrays, self.cfg)  # round 1 follows
            prepared = self.inputs.prepare(grid)
            if prepared:
                self.journal.append("prepared", **prepared)
        while state.round < self.cfg.num_rounds:
            server_round = state.round + 1
            started, exchanged = time.perf_counter(), grid.exchanges
            last = server_round in (self.cfg.num_rounds, self.cfg.stop_after_round)
            self.chain.upcoming = None if last else model_length(arrays, self.cfg)
            train_config = ConfigRecord({"run-key": self.run_key, **self.inputs.round_config()})
            messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
            if self.cfg.secure_aggregation:
                accepted, replies, notes = self._secure(grid, messages, arrays)
            else:
                received = grid.send_and_receive(messages, timeout=self.cfg.round_timeout)
                limits = self.cfg.max_update_norm, self.inputs.max_weight
                replies = refuse_duplicates(
                    [
                        receive(r, arrays, self.roster, max_norm=limits[0], max_weight=limits[1])
                        for r in received
                    ]
                )
                accepted, notes = [r.message for r in replies if r.message is not None], {}
            aggregated = None
            if accepted:
                aggregated, _ = strategy.aggregate_train(server_round, accepted)
            self._account(state, replies, server_round)
            metrics: dict[str, float] = {}
            if aggregated is not None:
                arrays = self.as_model(aggregated)
                metrics, evaluated = self.inputs.evaluate(grid, arrays, server_round)
                notes.update(evaluated)
                self._register(arrays, state, server_round, metrics)
                save_moments(strategy, moments, server_round)
                state.aggregated += 1
            else:  # the previous model stays; nothing is registered for this round
                state.no_aggregate = _why_nothing(replies, notes)
            state.round = server_round
            self.journal.append(
                "round",
                round=server_round,
                run_key=self.run_key,
                aggregated=aggregated is not None,
                metrics=metrics,
                seconds=time.perf_counter() - started,
                exchanges=grid.exchanges - exchanged,
                replies=[_describe(r) for r in replies],
                **({} if aggregated is not None else {"no_aggregate": state.no_aggregate}),
                **notes,
            )
            if replies and all(r.status == "refused" for r in replies):
                status = "budget-exhausted"
                break
            if server_round == self.cfg.stop_after_round < self.cfg.num_rounds:
                status = "paused"
                break
        if status != "budget-exhausted" and state.aggregated == 0:
            status = "no-aggregate"
        return self.summary(state, status)

    def _secure(
        self, grid: Grid, messages: list[Message], arrays: ArrayRecord
    ) -> tuple[list[Message], list[ReceivedReply], dict[str, Any]]:
        """One securely aggregated round: the strategy gets only the survivors' average.

        A node whose update did not make it into the sum (it dropped out, or the round failed)
        is recorded as "dropped"; its privacy spend is still accounted.
        """
        aggregation = SecureAggregation(self.cfg, grid, self.roster, self.chain)
        if self.cfg.dp_mode == "distributed":
            secure = aggregation.run_distributed(messages, arrays)
        else:
            secure = aggregation.run(messages, arrays, self.inputs.max_weight)
        failed = secure.arrays is None
        replies = [
            replace(r, status="dropped", problem=secure.error or secure.dropped[r.node])
            if r.status == "trained" and (failed or r.node in secure.dropped)
            else r
            for r in secure.replies
        ]
        notes = {
            "secure_aggregation": {
                "error": secure.error,
                "dropped": secure.dropped,
                "parameters": secure.parameters,
                "keys_ahead": secure.keys_ahead,
                "shares_ahead": secure.shares_ahead,
            },
            "stage_seconds": secure.seconds,
        }
        if secure.arrays is None:
            return [], replies, notes
        return [as_strategy_reply(secure.arrays, secure.total_weight, messages[0])], replies, notes

    def as_model(self, arrays: ArrayRecord) -> ArrayRecord:
        """The arrays in the model's own dtypes (Flower's FedAdam hands back float64)."""
        model = self.task.build_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        return ArrayRecord(model.state_dict())

    def _account(self, state: RunState, replies: list[ReceivedReply], server_round: int) -> None:
        for reply in replies:
            if not reply.metrics:  # a failed or unparseable reply says nothing about privacy
                continue
            previous = state.nodes.get(reply.node)
            epsilon = reply.metrics.get("epsilon", math.nan)
            state.nodes[reply.node] = NodePrivacy(
                id=reply.node,
                examples=_examples(reply.metrics),
                epsilon=epsilon if math.isfinite(epsilon) else None,
                delta=reply.metrics.get("delta", self.cfg.delta),
                noise_multiplier=reply.metrics.get("noise-multiplier", 0.0),
                rounds=(previous.rounds if previous else 0) + (reply.status == "trained"),
                epsilon_local=reply.metrics.get("epsilon-local"),
            )

    def _register(
        self, arrays: ArrayRecord, state: RunState, server_round: int, metrics: dict[str, float]
    ) -> None:
        version = version_name(self.run, server_round)
        self.registry.register(
            arrays.to_torch_state_dict(),
            Manifest(
                version=version,
                run=self.run,
                task=self.task.name,
                architecture=self.task.architecture,
                input_schema=self.inputs.input_schema(),
                round=server_round,
                metrics=metrics,
                nodes=sorted(state.nodes.values(), key=lambda n: n.id),
                config={**self.cfg.model_dump(), "fingerprint": self.cfg.fingerprint()},
                privacy=self.privacy,
                weights_sha256="",
                created=time.time(),
            ),
        )
        refs = {"latest": version}
        accuracy = metrics.get("accuracy", -math.inf)  # a round not evaluated is no candidate
        if accuracy > state.best_accuracy:
            state.best_accuracy = accuracy
            refs["best"] = version
        self.registry.set_refs(**refs)

    def summary(self, state: RunState, status: str) -> dict[str, Any]:
        versions = self.registry.versions(run=self.run)
        latest = self.registry.manifest(versions[-1]) if versions else None
        summary = {
            "status": status,
            "run": self.run,
            "task": self.task.name,
            "rounds": state.round,
            "accuracy": latest.metrics.get("accuracy", math.nan) if latest else math.nan,
            "loss": latest.metrics.get("loss", math.nan) if latest else math.nan,
            "metrics": latest.metrics if latest else {},
            "model_version": latest.version if latest else None,
            "registry": str(self.registry.root),
            "nodes": [n.model_dump() for n in sorted(state.nodes.values(), key=lambda n: n.id)],
            "aggregated_rounds": state.aggregated,
            "privacy": self.privacy,
        }
        if status == "no-aggregate":
            summary["error"] = f"no round aggregated any update ({state.no_aggregate})"
        self.journal.write_summary(summary)
        self.journal.append("end", status=status, error=summary.get("error", ""))
        return summary


def _examples(metrics: dict[str, float]) -> int | None:
    count = metrics.get("num-examples")
    return int(count) if count is not None and math.isfinite(count) else None


def load_roster(path: str) -> dict[int, str]:
    """Flower node id -> institution name, as the coordinator's kit registered them."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        return {int(node_id): str(name) for node_id, name in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"node-roster {path} is unreadable: {exc}") from None


def _why_nothing(replies: list[ReceivedReply], notes: dict[str, Any]) -> str:
    error = notes.get("secure_aggregation", {}).get("error", "")
    if error:
        return f"secure aggregation failed: {error}"
    if not replies:
        return "no node replied"
    counts: dict[str, int] = {}
    for reply in replies:
        counts[reply.status] = counts.get(reply.status, 0) + 1
    return "no update to aggregate: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _describe(reply: ReceivedReply) -> dict[str, Any]:
    return {
        "node": reply.node,
        "status": reply.status,
        "epsilon": reply.metrics.get("epsilon"),
        "examples": reply.metrics.get("num-examples"),
        "problem": reply.problem,
    }


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """The ServerApp's body: run the rounds, and journal any failure before re-raising it."""
    try:
        return RoundLoop(cfg).run_rounds(grid)
    except Exception as exc:
        Journal(cfg.output_path).append("failed", error=f"{type(exc).__name__}: {exc}")
        raise
