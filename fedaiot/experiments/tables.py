"""A sweep's results as data frames: the shapes the report's tables and plots are drawn from."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fedaiot.errors import BadInputError
from fedaiot.experiments.results import NODE_ROUNDS, RESULTS, ROUNDS, dp_mode

SETTING = ["task", "kind", "nodes", "partition", "secure_aggregation", "dp_mode", "scenario"]


class ReportError(BadInputError):
    """The folder holds no sweep results, or they are malformed."""


def _read(path: Path) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, keep_default_na=True)


def load(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``results`` (last row per point), ``rounds`` and ``node_rounds``, typed."""
    results = _read(Path(folder) / RESULTS)
    if results.empty:
        raise ReportError(f"{folder} has no {RESULTS}: run `fedaiot sweep` first")
    missing = {"point_id", "status", "task", "epsilon", "accuracy"} - set(results.columns)
    if missing:
        raise ReportError(f"{folder / RESULTS} lacks columns {sorted(missing)}")
    results = results.drop_duplicates("point_id", keep="last").copy()
    results["epsilon"] = results["epsilon"].astype(float)
    results["secure_aggregation"] = results["secure_aggregation"].astype(str) == "True"
    recorded = results["dp_mode"] if "dp_mode" in results else pd.Series(None, results.index)
    results["dp_mode"] = [  # files from before the column: see fedaiot.experiments.results
        dp_mode(kind, math.isfinite(epsilon), None if pd.isna(mode) else str(mode))
        for kind, epsilon, mode in zip(results["kind"], results["epsilon"], recorded, strict=True)
    ]
    results["setting"] = results.apply(setting_label, axis=1)
    rounds = _read(Path(folder) / ROUNDS)
    nodes = _read(Path(folder) / NODE_ROUNDS)
    if not rounds.empty:
        rounds = rounds.drop_duplicates(["point_id", "round"], keep="last")
    if not nodes.empty:
        nodes = nodes.drop_duplicates(["point_id", "round", "node"], keep="last")
    return results, rounds, nodes


def setting_label(row: pd.Series) -> str:
    if row["kind"] == "central":
        return "central DP-SGD" if math.isfinite(row["epsilon"]) else "central"
    secure = "secagg" if row["secure_aggregation"] else "plain"
    label = f"{int(row['nodes'])} nodes, {row['partition']}, {secure}"
    if row["dp_mode"] == "distributed":  # local DP stays unnamed: labels of older reports
        label += ", distributed DP"
    return label if row["scenario"] == "none" else f"{label}, {row['scenario']}"


def epsilon_label(epsilon: float) -> str:
    return f"{epsilon:g}" if math.isfinite(epsilon) else "non-private"


def ok(results: pd.DataFrame) -> pd.DataFrame:
    return results[results["status"] != "failed"]


def grid(results: pd.DataFrame) -> pd.DataFrame:
    """Grid and baseline points (no scenarios), completed."""
    return ok(results)[ok(results)["scenario"] == "none"]


def spread(results: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """Mean, standard deviation and count of ``value`` over seeds, per setting and epsilon."""
    grouped = results.groupby(["task", "setting", "kind", "epsilon"], dropna=False)[value]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def utility_table(results: pd.DataFrame, task: str) -> pd.DataFrame:
    """Rows: settings (central baselines last); columns: epsilons; cells: 'mean ± std (n)'."""
    stats = spread(grid(results)[grid(results)["task"] == task])
    if stats.empty:
        return pd.DataFrame()
    stats["cell"] = stats.apply(
        lambda r: f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} ({int(r['count'])})", axis=1
    )
    table = stats.pivot(index="setting", columns="epsilon", values="cell").fillna("")
    # a setting's distributed row sorts right after its local row; central baselines last
    order = sorted(table.index, key=lambda s: (s.startswith("central"), s))
    table = table.loc[order, sorted(table.columns)]
    table.columns = [epsilon_label(e) for e in table.columns]
    return table


def gap_table(results: pd.DataFrame, task: str) -> pd.DataFrame:
    """Federated accuracy minus the central baselines, in points, per setting and epsilon."""
    stats = spread(grid(results)[grid(results)["task"] == task])
    central_dp = stats[stats["setting"] == "central DP-SGD"].set_index("epsilon")["mean"]
    central = stats[stats["setting"] == "central"]["mean"]
    federated = stats[stats["kind"] == "federated"]
    rows = []
    for _, row in federated.iterrows():
        dp = central_dp.get(row["epsilon"]) if math.isfinite(row["epsilon"]) else None
        rows.append(
            {
                "setting": row["setting"],
                "epsilon": epsilon_label(row["epsilon"]),
                "federated": f"{100 * row['mean']:.1f}",
                "vs central DP-SGD (points)": _points(row["mean"], dp),
                "vs central non-private (points)": _points(
                    row["mean"], None if central.empty else float(central.iloc[0])
                ),
            }
        )
    return pd.DataFrame(rows)


def trust_table(results: pd.DataFrame, task: str) -> pd.DataFrame:
    """Distributed settings: the epsilon under the run's trust assumption and without it."""
    done = grid(results)
    done = done[(done["task"] == task) & (done["dp_mode"] == "distributed")]
    if done.empty:
        return pd.DataFrame()
    if "epsilon_local_max" not in done:
        done = done.assign(epsilon_local_max=math.nan)
    table = done.groupby(["setting", "epsilon"])[["epsilon_spent_max", "epsilon_local_max"]]
    table = table.max().reset_index()
    return pd.DataFrame(
        {
            "setting": table["setting"],
            "budget": table["epsilon"].map(epsilon_label),
            "epsilon spent (trust assumption)": table["epsilon_spent_max"].map(_epsilon),
            "epsilon of a node's own share alone": table["epsilon_local_max"].map(_epsilon),
        }
    )


def _epsilon(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.3g}"


def _points(value: float, reference: float | None) -> str:
    return "" if reference is None else f"{100 * (value - reference):+.1f}"


def membership_table(results: pd.DataFrame) -> pd.DataFrame:
    done = grid(results).dropna(subset=["mia_loss_auc"])
    if done.empty:
        return pd.DataFrame()
    grouped = done.groupby(["task", "kind", "dp_mode", "epsilon"])
    table = grouped[["mia_loss_auc", "mia_calibrated_auc", "accuracy"]].mean().reset_index()
    table["epsilon"] = table["epsilon"].map(epsilon_label)
    return table


def scenario_table(results: pd.DataFrame, rounds: pd.DataFrame) -> pd.DataFrame:
    done = ok(results)
    played = done[done["point_id"].isin(scenario_points(results))]
    if played.empty:
        return pd.DataFrame()
    rows = []
    for _, point in played.iterrows():
        its = rounds[rounds["point_id"] == point["point_id"]] if not rounds.empty else rounds
        rows.append(
            {
                "scenario": point["scenario"],
                "seed": int(point["seed"]),
                "accuracy": f"{100 * point['accuracy']:.1f}",
                "max epsilon": f"{point['epsilon_spent_max']:.3f}",
                "node-rounds trained": int(its["trained"].sum()) if len(its) else 0,
                "refused": int(its["refused"].sum()) if len(its) else 0,
                "failed or dropped": int(its["failed"].sum()) if len(its) else 0,
                "median s/round": f"{its['seconds'].median():.1f}" if len(its) else "",
            }
        )
    return pd.DataFrame(rows)


def scenario_points(results: pd.DataFrame) -> set[str]:
    """Scenario points and their fault-free control (same setting, scenario 'none')."""
    scenarios = results[results["scenario"] != "none"]
    if scenarios.empty:
        return set()
    keys = [
        "task",
        "epsilon",
        "nodes",
        "partition",
        "secure_aggregation",
        "dp_mode",
        "seed",
        "rounds",
    ]
    controls = results.merge(scenarios[keys].drop_duplicates(), on=keys)
    controls = controls[controls["scenario"] == "none"]
    return set(scenarios["point_id"]) | set(controls["point_id"])
