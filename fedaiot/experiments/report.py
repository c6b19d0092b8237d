"""The sweep's report: Markdown with PNG plots, built from the results files alone.

It can be rebuilt at any time (``fedaiot report FOLDER``), from a finished sweep, a partial
one, or results copied from elsewhere: nothing but the CSV files is read.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from fedaiot.experiments import plots
from fedaiot.experiments.tables import (
    ReportError,
    gap_table,
    grid,
    load,
    membership_table,
    scenario_table,
    trust_table,
    utility_table,
)

REPORT = "report.md"

DISTRIBUTED = (
    "Rows marked *distributed DP* add the noise differently (`dp-mode=distributed`). With "
    "local DP each node noises its own update, and its epsilon holds against everyone, the "
    "coordinator included. With distributed DP each node adds a share of integer noise inside "
    "secure aggregation and a round is one DP-SGD step on the union of the nodes' records "
    "(hence more rounds, with their own learning rate and sample rate); its epsilon holds while "
    "the coordinator colludes with at most `dp-collusion` nodes. What a node's own share "
    "guarantees alone, were every other node to collude:"
)

# Published central results at a given budget, shown beside ours (accuracy, source).
LITERATURE: dict[tuple[str, float], tuple[float, str]] = {
    ("fashion-mnist", 3.0): (
        0.860,
        "Tramer & Boneh, ICLR 2021: end-to-end CNN, central DP-SGD, epsilon 3, delta 1e-5",
    ),
}


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    if frame.empty:
        return "_no data_\n"
    frame = frame.reset_index() if index else frame
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def build_report(folder: Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``folder``; returns the report's path."""
    folder = Path(folder)
    try:
        return _build(folder)
    except ReportError:
        raise
    except (KeyError, ValueError) as exc:  # a results file edited or cut short
        raise ReportError(f"{folder}: malformed results: {exc}") from None


def _build(folder: Path) -> Path:
    results, rounds, nodes = load(folder)
    out = folder / "plots"
    failed = results[results["status"] == "failed"]
    lines = [
        f"# Sweep report: {folder.name}",
        "",
        f"{len(results)} points: {len(results) - len(failed)} measured, {len(failed)} failed. "
        f"Built {time.strftime('%Y-%m-%d %H:%M')} from `{folder}` by `fedaiot report {folder}`.",
        "",
        "Accuracy is on the task's held-out test set, never trained on. Epsilon is per node "
        "(per record of each institution), delta 1e-5. Cells are mean ± standard deviation over "
        "seeds, with the number of seeds in brackets.",
        "",
    ]
    for task in sorted(grid(results)["task"].unique()):
        lines += [
            f"## {task}: what privacy costs in accuracy",
            "",
            markdown_table(utility_table(results, task), index=True),
            "Gap to the central baselines (federated minus central, in accuracy points):",
            "",
            markdown_table(gap_table(results, task)),
        ]
        trust = trust_table(results, task)
        if not trust.empty:
            lines += [DISTRIBUTED, "", markdown_table(trust)]
        lines += _literature(results, task)
    trade_off = plots.accuracy_vs_epsilon(results, out / "accuracy_vs_epsilon.png")
    lines += [f"![accuracy against epsilon]({_rel(trade_off, folder)})", ""]
    if not rounds.empty:
        per_round = plots.accuracy_per_round(results, rounds, out / "accuracy_per_round.png")
        lines += [
            "## Accuracy per round",
            "",
            f"![accuracy per round]({_rel(per_round, folder)})",
            "",
        ]
    if not nodes.empty:
        spend = plots.node_epsilon_per_round(results, nodes, out / "node_epsilon.png")
        lines += [
            "## Each node's privacy spend, round by round",
            "",
            "Every line is one node's accountant (PLD, at delta 1e-5); the dashed line "
            "is its budget. A node stops at its budget: it refuses rounds it cannot afford."
            + (
                " In distributed DP panels a node's value is its distributed epsilon (Skellam "
                "noise, RDP accountant), under the trust assumption above, not the epsilon of "
                "its own share alone."
                if (grid(results)["dp_mode"] == "distributed").any()
                else ""
            ),
            "",
            f"![epsilon per round]({_rel(spend, folder)})",
            "",
        ]
    attack = membership_table(results)
    if not attack.empty:
        figure = plots.membership(results, out / "membership.png")
        lines += [
            "## Membership inference",
            "",
            "Attack AUC on the final model: members are the records the nodes trained on, "
            "non-members the held-out test records, balanced. 0.5 is chance. The loss attack "
            "thresholds the per-record loss (Yeom et al. 2018); the calibrated attack scores "
            "each record against its class (see `fedaiot/experiments/membership.py`). An AUC "
            "near 0.5 is empirical evidence, not a proof: the DP guarantee is the bound.",
            "",
            markdown_table(attack.round(3)),
            f"![membership inference]({_rel(figure, folder)})",
            "",
        ]
    faults = scenario_table(results, rounds)
    if not faults.empty:
        figure = plots.scenarios(results, rounds, out / "scenarios.png")
        lines += [
            "## Operational scenarios",
            "",
            "Each scenario runs the same setting as its fault-free control (`none`).",
            "",
            markdown_table(faults),
            f"![scenarios]({_rel(figure, folder)})",
            "",
        ]
    if not failed.empty:
        lines += [
            "## Failed points",
            "",
            markdown_table(failed[["point_id", "setting", "epsilon", "seed", "error"]]),
        ]
    path = folder / REPORT
    path.write_text("\n".join(lines))
    return path


def _literature(results: pd.DataFrame, task: str) -> list[str]:
    lines = []
    mine = grid(results)
    for (name, epsilon), (accuracy, source) in LITERATURE.items():
        if name != task:
            continue
        ours = mine[(mine["task"] == task) & (mine["epsilon"] == epsilon)]
        if ours.empty:
            continue
        lines += [
            f"Published reference at epsilon {epsilon:g}: {100 * accuracy:.1f} % ({source}).",
            "",
        ]
        for setting, rows in ours.groupby("setting"):
            mean = rows["accuracy"].mean()
            lines.append(f"- {setting}: {100 * mean:.1f} % ({100 * (mean - accuracy):+.1f} points)")
        lines.append("")
    return lines


def _rel(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder))
