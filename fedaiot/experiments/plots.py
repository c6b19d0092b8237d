"""The report's figures, drawn with matplotlib (no display needed) into PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report is built on servers and in CI

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes

from fedaiot.experiments.tables import epsilon_label, grid, ok, scenario_points, spread


def _x(epsilon: float, finite: list[float]) -> float:
    """Non-private points sit one step right of the largest epsilon on the log axis."""
    return epsilon if math.isfinite(epsilon) else (max(finite) * 2 if finite else 1.0)


def _epsilon_axis(axis: Axes, epsilons: list[float]) -> None:
    finite = sorted(e for e in epsilons if math.isfinite(e))
    axis.set_xscale("log")
    ticks = sorted({_x(e, finite) for e in epsilons})
    axis.set_xticks(ticks)
    axis.set_xticklabels(
        [epsilon_label(e) if e in finite else "non-\nprivate" for e in ticks], fontsize=8
    )
    axis.minorticks_off()
    axis.set_xlabel("epsilon per node (delta 1e-5)")


def accuracy_vs_epsilon(results: pd.DataFrame, path: Path) -> Path:
    data = grid(results)
    tasks = sorted(data["task"].unique())
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        stats = spread(data[data["task"] == task])
        epsilons = list(stats["epsilon"].unique())
        finite = [e for e in epsilons if math.isfinite(e)]
        for setting, rows in stats.groupby("setting"):
            rows = rows.sort_values("epsilon")
            xs = [_x(e, finite) for e in rows["epsilon"]]
            if setting == "central":  # one non-private value: a reference line
                axis.axhline(100 * rows["mean"].iloc[0], color="black", ls=":", label="central")
                continue
            style = _style(rows)
            axis.errorbar(
                xs,
                100 * rows["mean"],
                yerr=100 * rows["std"],
                capsize=3,
                label=str(setting),
                **style,
            )
        _epsilon_axis(axis, epsilons)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(f"{task}: accuracy against privacy (mean ± sd over seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(figure, path)


def _style(rows: pd.DataFrame) -> dict[str, str]:
    """Central DP-SGD in black dashes; distributed DP in dash-dots with square markers."""
    if (rows["kind"] == "central").all():
        return {"ls": "--", "color": "black", "marker": "o"}
    if rows["setting"].str.endswith("distributed DP").all():
        return {"ls": "-.", "marker": "s"}
    return {"marker": "o"}


def accuracy_per_round(results: pd.DataFrame, rounds: pd.DataFrame, path: Path) -> Path:
    data = grid(results)
    data = data[data["kind"] == "federated"]
    merged = rounds.merge(data[["point_id", "task", "setting", "epsilon"]], on="point_id")
    tasks = sorted(merged["task"].unique())
    settings = sorted(merged["setting"].unique())
    figure, axes = plt.subplots(
        len(tasks), len(settings), figsize=(4.5 * len(settings), 3.4 * len(tasks)), squeeze=False
    )
    for i, task in enumerate(tasks):
        for j, setting in enumerate(settings):
            axis = axes[i][j]
            chosen = merged[(merged["task"] == task) & (merged["setting"] == setting)]
            for epsilon, rows in sorted(chosen.groupby("epsilon"), key=lambda g: g[0]):
                mean = rows.groupby("round")["accuracy"].mean()
                axis.plot(mean.index, 100 * mean.values, label=epsilon_label(float(epsilon)))
            axis.set_title(f"{task}\n{setting}", fontsize=9)
            axis.set_xlabel("round")
            axis.set_ylabel("test accuracy (%)")
            axis.grid(alpha=0.3)
            axis.legend(title="epsilon", fontsize=7)
    return _save(figure, path)


def node_epsilon_per_round(results: pd.DataFrame, nodes: pd.DataFrame, path: Path) -> Path:
    """One panel per budget: each node's spend, round by round, under its budget line."""
    data = ok(results)
    data = data[(data["kind"] == "federated") & data["epsilon"].map(math.isfinite)]
    distributed = data["dp_mode"] == "distributed"  # after their local twins
    shown = data.assign(_later=distributed).sort_values(["scenario", "_later", "seed"])
    shown = shown.drop_duplicates(["task", "epsilon", "dp_mode", "scenario"])
    shown = shown.head(6)
    figure, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
    for axis, (_, point) in zip(axes[0], shown.iterrows(), strict=True):
        mine = nodes[(nodes["point_id"] == point["point_id"]) & nodes["epsilon"].notna()]
        for node, rows in mine.groupby("node"):
            axis.plot(rows["round"], rows["epsilon"], lw=1, alpha=0.8, label=str(node))
        axis.axhline(point["epsilon"], color="red", ls="--", label="budget")
        scenario = "" if point["scenario"] == "none" else f", {point['scenario']}"
        mode = ", distributed DP" if point["dp_mode"] == "distributed" else ""
        title = f"{point['task']}, budget {point['epsilon']:g}{mode}{scenario}"
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("round")
        axis.set_ylabel("epsilon spent")
        axis.grid(alpha=0.3)
    if len(shown):
        axes[0][0].legend(fontsize=6, ncol=2)
    return _save(figure, path)


def membership(results: pd.DataFrame, path: Path) -> Path:
    data = grid(results).dropna(subset=["mia_loss_auc"])
    figure, axis = plt.subplots(figsize=(6, 4))
    epsilons = list(data["epsilon"].unique())
    finite = [e for e in epsilons if math.isfinite(e)]
    # one line per kind, non-private points at its right end; distributed DP a line of its own
    line = data["dp_mode"].where(data["dp_mode"] == "distributed", "")
    for (task, kind, mode), rows in data.groupby(["task", "kind", line]):
        described = f"{task} {kind}" + (" distributed DP" if mode else "")
        for column, marker in (("mia_loss_auc", "o"), ("mia_calibrated_auc", "s")):
            stats = rows.groupby("epsilon")[column].agg(["mean", "std"]).reset_index()
            attack = "loss" if column == "mia_loss_auc" else "calibrated"
            axis.errorbar(
                [_x(e, finite) for e in stats["epsilon"]],
                stats["mean"],
                yerr=stats["std"].fillna(0.0),
                marker=marker,
                capsize=3,
                label=f"{described}, {attack} attack",
            )
    axis.axhline(0.5, color="black", ls=":", label="chance")
    _epsilon_axis(axis, epsilons or [1.0])
    axis.set_ylabel("membership attack AUC")
    axis.set_title("Membership inference on the final model")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, path)


def scenarios(results: pd.DataFrame, rounds: pd.DataFrame, path: Path) -> Path:
    data = ok(results)
    chosen = data[data["point_id"].isin(scenario_points(results))]
    merged = rounds.merge(chosen[["point_id", "scenario"]], on="point_id")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for scenario, rows in merged.groupby("scenario"):
        mean = rows.groupby("round")[["accuracy", "epsilon_spent_max", "trained"]].mean()
        left.plot(mean.index, 100 * mean["accuracy"], label=str(scenario))
        right.plot(mean.index, mean["trained"], label=str(scenario))
    left.set_ylabel("test accuracy (%)")
    right.set_ylabel("nodes whose update was aggregated")
    for axis in (left, right):
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Operational scenarios against the fault-free control")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
