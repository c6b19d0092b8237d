"""What a person sees while a run goes on and when it ends: a progress bar and tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class RoundProgress:
    """A rich progress bar over rounds, fed with the coordinator's journal events."""

    def __init__(self, console: Console, total_rounds: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("rounds", total=total_rounds, status="starting Flower")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            done = event.get("resumed_after", 0)
            self.progress.update(self.task, completed=done, status="waiting for nodes")
            if done:
                self.console.print(f"resuming run {event['run']} after round {done}")
        elif kind == "round":
            metrics = event["metrics"]
            epsilons = [r["epsilon"] for r in event["replies"] if r.get("epsilon") is not None]
            refused = [r["node"] for r in event["replies"] if r["status"] != "trained"]
            if event.get("aggregated", True):
                shown = [
                    f"{k} {metrics[k]:.4f}" for k in ("accuracy", "loss", "auc") if k in metrics
                ]
                result = "  ".join(shown) or "aggregated (not evaluated this round)"
                status = f"acc {metrics['accuracy']:.3f}" if "accuracy" in metrics else "trained"
            else:
                result = f"[red]no aggregate, model kept: {event.get('no_aggregate', '')}[/]"
                status = "no aggregate"
            line = (
                f"round {event['round']:>3}: {result}  "
                f"max epsilon {_fmt(max(epsilons) if epsilons else None)}  "
                f"{event['seconds']:.1f}s"
            )
            if refused:
                line += f"  [yellow]not used: {', '.join(refused)}[/]"
            self.console.print(line)
            self.progress.update(self.task, completed=event["round"], status=status)
        elif kind == "failed":
            self.console.print(f"[red]run failed: {event['error']}[/]")


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    result = Table(title=f"run {summary.get('run')} ({summary.get('status')})")
    result.add_column("metric")
    result.add_column("value", justify="right")
    for key in ("accuracy", "loss", "auc", "sensitivity", "specificity"):
        value = summary.get(key, summary.get("metrics", {}).get(key))
        if value is not None:
            result.add_row(key, _fmt(value, 4))
    result.add_row("rounds", str(summary.get("rounds")))
    result.add_row("wall seconds", _fmt(summary.get("wall_seconds"), 1))
    result.add_row("model version", str(summary.get("model_version")))
    privacy = summary.get("privacy", {})
    if privacy and not privacy.get("private", True) and "seed" in privacy.get("noise", ""):
        result.add_row("privacy", f"[red]{privacy['noise']}[/]")

    tables = [result]
    exact = summary.get("exact") or {}
    if exact.get("pooled"):
        measured = Table(title="measured by the simulation on every site's held-out rows")
        for column in ("model", "accuracy", "auc", "sensitivity", "specificity"):
            measured.add_column(column, justify="left" if column == "model" else "right")
        rows = {"federated (this run)": exact["pooled"]}
        rows.update({f"  site {site}": values for site, values in exact.get("sites", {}).items()})
        rows["pooled logistic regression"] = exact.get("pooled_logistic_regression", {})
        if "pooled_dp_sgd" in exact:
            rows["pooled DP-SGD, same epsilon"] = exact["pooled_dp_sgd"]
        for name, values in rows.items():
            cells = [
                _fmt(values.get(k), 4) for k in ("accuracy", "auc", "sensitivity", "specificity")
            ]
            measured.add_row(name, *cells)
        tables.append(measured)

    nodes = Table(title="privacy spent per node")
    for column in ("node", "examples", "epsilon", "delta", "noise multiplier", "rounds"):
        nodes.add_column(column, justify="left" if column == "node" else "right")
    for node in summary.get("nodes", []):
        nodes.add_row(
            node["id"],
            "masked" if node["examples"] is None else str(node["examples"]),
            _fmt(node["epsilon"]) if node["epsilon"] is not None else "inf (non-private)",
            f"{node['delta']:g}",
            _fmt(node["noise_multiplier"]),
            str(node["rounds"]),
        )
    return [*tables, nodes]
