"""Run a sweep point by point, recording each as it finishes, resuming where it stopped.

Federated points go through :func:`fedaiot.simulation.engine.simulate`: Flower's simulation engine
and the project's own ServerApp and ClientApp, as ``fedaiot simulate`` runs them. A point that
fails is recorded with its error and the sweep goes on; an interrupted point leaves no row, so
the next invocation runs it again, and its Flower run resumes after its last finished round.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedaiot.experiments.results import ResultsStore, point_fields
from fedaiot.experiments.spec import Point, SweepSpec, expand
from fedaiot.rounds.journal import Journal

if TYPE_CHECKING:
    from fedaiot.experiments.membership import MembershipResult

PointRunner = Callable[[Point, Path, Callable[[int], None]], "Measured"]


@dataclass
class Measured:
    """What one point produced: its result columns and its per-round rows."""

    result: dict[str, Any]
    rounds: list[dict[str, Any]]
    node_rounds: list[dict[str, Any]]


@dataclass(frozen=True)
class SweepOutcome:
    points: int
    ran: int
    failed: int
    skipped: int


def run_sweep(
    spec: SweepSpec,
    folder: Path,
    *,
    console: Console | None = None,
    retry_failed: bool = False,
    membership: bool | None = None,
    runner: PointRunner | None = None,
) -> SweepOutcome:
    """Run every point of ``spec`` not yet recorded in ``folder``.

    Failed points count as recorded unless ``retry_failed``. ``runner`` replaces how one point
    is measured (tests use it to fail on purpose); by default :func:`measure`.
    """
    console = console or Console(stderr=True)
    store = ResultsStore(folder)
    points = expand(spec)
    recorded = store.finished(include_failed=not retry_failed)
    todo = [p for p in points if p.id not in recorded]
    if retry_failed:
        failed_before = set(store.finished()) - set(recorded)
        for point in todo:
            if point.id in failed_before:
                _set_aside(folder / "runs" / point.id)
    use_membership = spec.membership if membership is None else membership

    def default_runner(point: Point, folder: Path, tick: Callable[[int], None]) -> Measured:
        return measure(point, folder, tick, membership=use_membership)

    measure_point = runner or default_runner
    console.print(plan(points), highlight=False)
    failed = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task(f"sweep {spec.name}", total=len(points))
        progress.update(overall, completed=len(points) - len(todo))
        for point in todo:
            label = escape(describe(point))
            rounds = progress.add_task(f"  {label}", total=max(point.rounds, 1))
            started = time.perf_counter()

            def tick(done: int, task: TaskID = rounds) -> None:
                progress.update(task, completed=done)

            try:
                measured = measure_point(point, folder, tick)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failed += 1
                error = f"{type(exc).__name__}: {exc}".strip()
                measured = Measured({"status": "failed", "error": error}, [], [])
                progress.console.print(f"[red]failed[/] {label}: {escape(error)}", highlight=False)
                if console.is_terminal:
                    progress.console.print(escape(traceback.format_exc(limit=3)), highlight=False)
            measured.result.setdefault("wall_seconds", time.perf_counter() - started)
            if measured.result["status"] != "failed":
                progress.console.print(f"done {label}: {_brief(measured.result)}", highlight=False)
            store.record({**point_fields(point), **measured.result}, *_rows(point, measured))
            progress.remove_task(rounds)
            progress.advance(overall)
    return SweepOutcome(len(points), len(todo), failed, len(points) - len(todo))


def _set_aside(run_dir: Path) -> None:
    """A failed point's run folder, renamed so that its retry starts afresh (a failed run's
    journal would otherwise be resumed after its last round) and the failure stays readable."""
    if not run_dir.exists():
        return
    attempt = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.failed-{attempt}")).exists():
        attempt += 1
    run_dir.rename(aside)


def _rows(point: Point, measured: Measured) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    tag = {"point_id": point.id}
    return (
        [{**tag, **row} for row in measured.rounds],
        [{**tag, **row} for row in measured.node_rounds],
    )


def _brief(result: dict[str, Any]) -> str:
    accuracy = result.get("accuracy")
    spent = result.get("epsilon_spent_max")
    parts = [f"accuracy {100 * accuracy:.1f} %" if accuracy is not None else "no accuracy"]
    if spent is not None and math.isfinite(spent):
        parts.append(f"epsilon {spent:.2f}")
    if result.get("mia_loss_auc") is not None:
        parts.append(f"attack AUC {result['mia_loss_auc']:.3f}")
    parts.append(f"{result['wall_seconds']:.0f} s")
    return ", ".join(parts)


def plan(points: list[Point]) -> str:
    """What the sweep measures, e.g. '18 points: 6 central, 6 local DP, 6 distributed DP'."""
    counts: dict[str, int] = {}
    for point in points:
        what = _mode(point) if point.kind == "federated" else "central"
        counts[what] = counts.get(what, 0) + 1
    return f"{len(points)} points: " + ", ".join(f"{n} {what}" for what, n in counts.items())


def _mode(point: Point) -> str:
    return f"{point.dp_mode} DP" if point.private else "non-private"


def describe(point: Point) -> str:
    budget = f"eps {point.epsilon:g}" if point.private else "non-private"
    if point.kind == "central":
        return f"{point.task} central {budget} seed {point.seed}"
    secure = "secagg" if point.secure_aggregation else "plain"
    mode = f" {point.dp_mode} DP" if point.private else ""
    scenario = "" if point.scenario == "none" else f" [{point.scenario}]"
    return (
        f"{point.task} {point.nodes} nodes {point.partition} {budget}{mode} {secure} "
        f"seed {point.seed}{scenario}"
    )


def measure(
    point: Point, folder: Path, tick: Callable[[int], None], *, membership: bool = True
) -> Measured:
    if point.kind == "central":
        return _central(point, membership)
    return _federated(point, folder, tick, membership)


def _central(point: Point, membership: bool) -> Measured:
    from fedaiot.experiments.central import train_central

    settings = point.overrides
    outcome = train_central(
        point.task,
        point.epsilon if point.private else None,
        epochs=int(settings["epochs"]),
        batch_size=int(settings["batch-size"]),
        learning_rate=float(settings["learning-rate"]),
        max_grad_norm=float(settings["max-grad-norm"]),
        seed=point.seed,
    )
    result: dict[str, Any] = {
        "status": "ok",
        "accuracy": outcome.metrics["accuracy"],
        "loss": outcome.metrics["loss"],
        "auc": outcome.metrics.get("auc"),
        "epsilon_spent_max": outcome.epsilon,
        "epsilon_spent_mean": outcome.epsilon,
    }
    if membership:
        from fedaiot.experiments.membership import attack

        result |= _attack_columns(attack(outcome.model, outcome.pool, outcome.test))
    return Measured(result, [], [])


def _federated(
    point: Point, folder: Path, tick: Callable[[int], None], membership: bool
) -> Measured:
    from fedaiot.simulation.engine import completed, preflight, simulate

    run_dir = (folder / "runs" / point.id).resolve()
    cfg = point.run_config(run_dir)
    done = preflight(cfg, point.nodes)

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] != "round":
            return
        tick(int(event["round"]))
        if point.exhaust_node is not None and event["round"] == point.exhaust_after_round:
            from fedaiot.experiments.scenarios import spend_elsewhere
            from fedaiot.node.round import simulated_ledger_dir, simulated_partition
            from fedaiot.privacy.ledger import PrivacyLedger

            data = simulated_partition(cfg, point.exhaust_node, point.nodes)
            folder = simulated_ledger_dir(cfg, point.exhaust_node)
            ledger = PrivacyLedger.for_data(folder, data).path
            spend_elsewhere(ledger, budget=cfg.epsilon, delta=cfg.delta)

    outcome = completed(cfg, done) or simulate(cfg, point.nodes, on_event=on_event)
    if outcome.status == "failed":
        raise RuntimeError(outcome.error)
    budget = cfg.epsilon if cfg.private else None
    rounds, node_rounds = journal_rows(Journal(run_dir), budget=budget)
    summary = outcome.summary
    epsilons = [n["epsilon"] for n in summary.get("nodes", []) if n.get("epsilon") is not None]
    shares = [
        n["epsilon_local"] for n in summary.get("nodes", []) if n.get("epsilon_local") is not None
    ]
    metrics = summary.get("metrics", {})
    result: dict[str, Any] = {
        "status": "ok" if outcome.status == "completed" else outcome.status,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "auc": metrics.get("auc"),
        "epsilon_spent_max": max(epsilons) if epsilons else math.inf,
        "epsilon_spent_mean": sum(epsilons) / len(epsilons) if epsilons else math.inf,
        "epsilon_local_max": max(shares) if shares else None,
        "rounds_completed": summary.get("rounds"),
        "wall_seconds": outcome.wall_seconds,
        "run_dir": str(run_dir),
    }
    if membership:
        from fedaiot.experiments.membership import attack_run

        result |= _attack_columns(attack_run(run_dir))
    return Measured(result, rounds, node_rounds)


def _attack_columns(found: MembershipResult) -> dict[str, Any]:
    return {
        "mia_loss_auc": found.loss_auc,
        "mia_calibrated_auc": found.calibrated_auc,
        "mia_tpr_at_1pct_fpr": found.tpr_at_1pct_fpr,
    }


def journal_rows(
    journal: Journal, *, budget: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-round and per-node rows from a run's journal (a resumed round counts once)."""
    events, _ = journal.events()
    latest = {e["round"]: e for e in events if e["event"] == "round"}
    rounds, nodes = [], []
    spent: dict[str, float] = {}
    for number in sorted(latest):
        event = latest[number]
        replies = event.get("replies", [])
        for reply in replies:
            if reply.get("epsilon") is not None:
                spent[reply["node"]] = reply["epsilon"]
            nodes.append(
                {
                    "round": number,
                    "node": reply["node"],
                    "status": reply["status"],
                    "epsilon": reply.get("epsilon"),
                    "budget": budget,
                }
            )
        statuses = [r["status"] for r in replies]
        rounds.append(
            {
                "round": number,
                "accuracy": event["metrics"].get("accuracy"),
                "loss": event["metrics"].get("loss"),
                "seconds": event.get("seconds"),
                "trained": statuses.count("trained"),
                "refused": statuses.count("refused"),
                "failed": len(statuses) - statuses.count("trained") - statuses.count("refused"),
                "epsilon_spent_max": max(spent.values()) if spent else None,
            }
        )
    return rounds, nodes
