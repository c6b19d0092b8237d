"""Monitoring without the service: drift bins and PSI, time-slotted counts, the promotion gate's
intervals, what a journal says about nodes, and the alert rules file's errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedaiot.monitoring.drift import psi
from fedaiot.monitoring.events import Tracker
from fedaiot.monitoring.gate import (
    Counts,
    GatePolicy,
    difference_interval,
    promotion_gate,
    wilson,
)
from fedaiot.monitoring.journal import epsilons, missing_nodes, rounds, run_budget
from fedaiot.monitoring.rules import (
    AccuracyDrop,
    Budget,
    Drift,
    RulesError,
    load_rules,
    parse_rules,
)
from fedaiot.monitoring.window import SlotCounts
from fedaiot.tasks.histogram import (
    BINS,
    bin_counts,
    reference,
    reference_frequencies,
    standard_normal,
)

# --- bins and PSI ------------------------------------------------------------------------------


def test_bins_count_each_feature_and_every_value_of_a_channel() -> None:
    z = np.array([[-3.0, 0.1], [2.5, 0.2], [-0.1, -1.2]])  # 3 rows, 2 features
    counts = bin_counts(z)
    assert counts.shape == (2, BINS) and counts.sum(axis=1).tolist() == [3, 3]
    assert counts[0, 0] == 1 and counts[0, BINS - 1] == 1  # the two open tails
    series = np.zeros((4, 3, 50))  # 4 rows, 3 channels, 50 steps
    assert bin_counts(series).sum(axis=1).tolist() == [200, 200, 200]


def test_psi_is_near_zero_for_the_training_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    train = standard_normal()
    ref = np.tile(train, (3, 1))
    same = bin_counts(rng.standard_normal((5000, 3)))
    shifted = bin_counts(rng.standard_normal((5000, 3)) + np.array([0.0, 1.0, 3.0]))
    assert (psi(same, ref) < 0.01).all()
    values = psi(shifted, ref)
    assert values[0] < 0.01 < 0.25 < values[1] < values[2]


def test_a_reference_from_held_out_data_is_checked_when_a_model_loads() -> None:
    rng = np.random.default_rng(1)
    skewed = rng.exponential(size=(2000, 2)) - 1.0  # standardized, but not normal
    schema = {"drift_reference": reference(skewed)}
    table = reference_frequencies(schema, 2)
    assert np.allclose(table.sum(axis=1), 1.0)
    live = bin_counts(rng.exponential(size=(2000, 2)) - 1.0)
    # The held-out reference sees no drift where the standard normal would see a lot.
    assert (psi(live, table) < 0.02).all()
    assert (psi(live, reference_frequencies({}, 2)) > 0.1).all()
    with pytest.raises(ValueError, match=r"shape \[2, 10\], expected \[3, 10\]"):
        reference_frequencies(schema, 3)
    with pytest.raises(ValueError, match="edges"):
        reference_frequencies({"drift_reference": {**schema["drift_reference"], "edges": [0]}}, 2)


def test_slot_counts_sum_recent_windows_and_forget_past_the_horizon() -> None:
    counts = SlotCounts((2,), slot_seconds=10, horizon_seconds=60)
    counts.add(np.array([1, 0]), now=5)
    counts.add(np.array([1, 1]), now=7)  # same slot
    counts.add(np.array([0, 5]), now=35)
    assert counts.window(10, now=39).tolist() == [0, 5]
    assert counts.window(60, now=39).tolist() == [2, 6]
    counts.add(np.array([1, 0]), now=200)  # the early slots fall off the horizon
    assert counts.window(3600, now=200).tolist() == [1, 0]
    assert counts.total().tolist() == [3, 6]


def test_a_condition_fires_after_its_for_period_once_and_resolves() -> None:
    tracker = Tracker()
    assert tracker.update("drift", "v1", True, 30, now=0) is None
    assert tracker.update("drift", "v1", True, 30, now=29) is None
    assert tracker.update("drift", "v1", True, 30, now=31) == "fire"
    assert tracker.update("drift", "v1", True, 30, now=40) is None
    assert tracker.firing("drift") == ["v1"]
    assert tracker.update("drift", "v1", False, 30, now=50) == "resolve"
    assert tracker.update("drift", "v1", False, 30, now=60) is None
    assert tracker.update("drift", "v1", True, 30, now=61) is None  # the period starts again


# --- the gate ----------------------------------------------------------------------------------


def test_intervals_match_newcombes_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17: 56/70 - 48/80 and 9/10 - 3/10, method 10.
    low, high = difference_interval(Counts(56, 70), Counts(48, 80))
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    low, high = difference_interval(Counts(9, 10), Counts(3, 10))
    assert (round(low, 4), round(high, 4)) == (0.1705, 0.8090)
    # Newcombe (1998), Statistics in Medicine 17: 81/263, Wilson score interval.
    assert tuple(round(v, 4) for v in wilson(Counts(81, 263))) == (0.2553, 0.3662)


def test_the_gate_promotes_refuses_or_waits() -> None:
    policy = GatePolicy(margin=-0.02, confidence=0.95, min_agreement=0.9, min_shadow_rows=500)
    better = Counts.of(0.97, 2000)
    served = Counts.of(0.95, 2000)
    agreed = Counts(480, 500)
    assert promotion_gate(better, served, agreed, policy).outcome == "promote"
    assert promotion_gate(better, served, Counts(100, 120), policy).outcome == "wait"
    low = promotion_gate(better, served, Counts(400, 500), policy)
    assert low.outcome == "refuse" and "agreement 0.800" in low.summary()
    # 3 points worse: refused at once, whatever the shadow traffic.
    worse = promotion_gate(Counts.of(0.92, 2000), served, Counts(0, 0), policy)
    assert worse.outcome == "refuse" and "lower bound is below the margin" in worse.summary()
    # Equal accuracy on a small set: the interval is wide, so a margin of 0 is not met.
    small = promotion_gate(Counts.of(0.95, 100), Counts.of(0.95, 100), agreed, GatePolicy())
    assert small.outcome == "refuse" and small.interval[0] < -0.05


# --- journals ----------------------------------------------------------------------------------


def _journal(folder: Path, replies_per_round: list[list[tuple[str, str, float | None]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"event": "start", "run": folder.name})]
    for number, replies in enumerate(replies_per_round, start=1):
        described = [
            {"node": n, "status": s, "epsilon": e, "examples": None, "problem": ""}
            for n, s, e in replies
        ]
        lines.append(json.dumps({"event": "round", "round": number, "replies": described}))
    (folder / "journal.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "journal.jsonl"


def test_missing_nodes_and_epsilons_from_a_journal(tmp_path: Path) -> None:
    path = _journal(
        tmp_path / "run",
        [
            [("a", "trained", 0.5), ("b", "trained", 0.5), ("c", "trained", 0.5)],
            [("a", "trained", 1.0), ("b", "dropped", 1.0), ("c", "refused", 0.5)],
            [("a", "trained", 1.5), ("c", "refused", 0.5)],
            [("a", "trained", 2.0), ("b", "failed", None), ("c", "refused", 0.5)],
        ],
    )
    events = rounds(path)
    assert [m.node for m in missing_nodes(events, 3)] == ["b"]
    assert missing_nodes(events, 3)[0].rounds == 3 and missing_nodes(events, 3)[0].last_counted == 1
    assert missing_nodes(events, 4) == []
    assert epsilons(events) == {"a": 2.0, "b": 1.0, "c": 0.5}
    assert rounds(path.parent) == events  # the run folder works as well as the file
    assert run_budget(path) is None  # nothing registered yet


# --- rules files -------------------------------------------------------------------------------

GOOD = """
interval_seconds: 5
webhook: {url: "http://127.0.0.1:9/hook", timeout_seconds: 2}
rules:
  - {name: accuracy-drop, kind: accuracy_drop, max_drop: 0.02, rollback: true}
  - {name: drift, kind: drift, threshold: 0.2, for_seconds: 60}
  - {name: errors, kind: error_rate, threshold: 0.1}
  - {name: silent-node, kind: node_missing, journal: runs/bc, rounds: 2}
  - {name: budget, kind: budget, journal: /abs/run/journal.jsonl, fraction: 0.8, epsilon: 3}
  - {name: gate, kind: promotion_gate, margin: -0.01, examples: 114}
"""


def test_a_good_rules_file_loads_with_defaults_and_relative_journals(tmp_path: Path) -> None:
    path = tmp_path / "ops" / "alerts.yml"
    path.parent.mkdir()
    path.write_text(GOOD)
    rules = load_rules(path)
    kinds = [r.kind for r in rules.rules]
    assert kinds == [
        "accuracy_drop", "drift", "error_rate", "node_missing", "budget", "promotion_gate"
    ]  # fmt: skip
    first, drift, _, silent, budget = rules.rules[:5]
    assert isinstance(first, AccuracyDrop) and first.rollback and first.metric == "accuracy"
    assert isinstance(drift, Drift) and drift.min_rows == 200 and not drift.rollback
    assert silent.journal == path.parent / "runs" / "bc"  # type: ignore[union-attr]
    assert isinstance(budget, Budget) and budget.journal == Path("/abs/run/journal.jsonl")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [\n  - {name: a, kind: drift\n", "not valid YAML at line 2, column 3"),
        ("- just\n- a list\n", "expected a mapping with a 'rules' list"),
        ("rules: []\n", "field 'rules': List should have at least 1 item"),
        ("rules:\n  - {name: slow, kind: latency}\n",
         "rule 'slow' (rules[0]): field 'kind': unknown kind 'latency': one of accuracy_drop"),
        ("rules:\n  - {name: a}\n", "rule 'a' (rules[0]): field 'kind': missing: one of"),
        ("rules:\n  - {name: drifty, kind: drift, treshold: 0.2}\n",
         "rule 'drifty' (rules[0]): field 'treshold': is not a field of this rule (a typo?)"),
        ("rules:\n  - {name: ok, kind: drift}\n  - {name: e, kind: error_rate, threshold: 1.5}\n",
         "rule 'e' (rules[1]): field 'threshold': Input should be less than or equal to 1"),
        ("rules:\n  - {name: silent, kind: node_missing, journal: x, rollback: true}\n",
         "rule 'silent' (rules[0]): field 'rollback': only accuracy_drop, drift, error_rate"),
        ("rules:\n  - {name: a, kind: drift}\n  - {name: a, kind: error_rate}\n",
         "rule 'a' (rules[1]): field 'name': rules[0] has this name already"),
        ("rules:\n  - {kind: drift}\n", "rules[0]: field 'name': Field required"),
        ("rules:\n  - {name: 'a b', kind: drift}\n", "rule 'a b' (rules[0]): field 'name': use up"),
        ("webhook: {url: 'ftp://x'}\nrules:\n  - {name: a, kind: drift}\n",
         "field 'webhook.url': URL scheme should be 'http' or 'https'"),
        ("rules:\n  - {name: b, kind: budget}\n",
         "rule 'b' (rules[0]): field 'journal': Field required"),
        ("rules:\n  - {name: b, kind: budget, journal: x, fraction: lots}\n",
         "rule 'b' (rules[0]): field 'fraction': Input should be a valid number"),
        ("rules:\n  - {name: g, kind: promotion_gate, confidence: 1.5}\n",
         "rule 'g' (rules[0]): field 'confidence': Input should be less than 1"),
        ("interval_seconds: 0\nrules:\n  - {name: a, kind: drift}\n",
         "field 'interval_seconds': Input should be greater than or equal to 0.05"),
        ("rules:\n  - {name: a, kind: drift}\nsilence: true\n",
         "field 'silence': is not a setting"),
    ],
)  # fmt: skip
def test_every_bad_rules_file_gets_one_line_naming_the_rule_and_field(
    text: str, message: str
) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "alerts.yml")
    error = str(caught.value)
    assert error.startswith("alert rules alerts.yml: ") and "\n" not in error
    assert message in error


def test_an_unreadable_rules_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot be read"):
        load_rules(tmp_path / "missing.yml")


def test_latency_quantiles_are_the_upper_edges_of_their_buckets() -> None:
    from fedaiot.serving.monitor import _BUCKETS, _quantiles

    counts = np.zeros(len(_BUCKETS) + 1, dtype=np.int64)
    counts[1], counts[-1] = 98, 2  # 98 calls within 1 ms, 2 beyond the last edge (5 s)
    assert _quantiles(counts) == {"p50": 1.0, "p99": None}
    counts[-1] = 0
    counts[4] = 2  # within 10 ms
    assert _quantiles(counts) == {"p50": 1.0, "p99": 10.0}
    assert _quantiles(np.zeros_like(counts)) == {"p50": None, "p99": None}
