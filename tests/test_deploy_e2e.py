"""Real deployment on 127.0.0.1: a SuperLink and three SuperNodes, TLS and node authentication.

One flow, to pay Flower's start-up once: each institution makes its own keys and approves the
app bundle; a node with an off-schema file is refused before it starts; the coordinator starts
the SuperLink, registers the institutions and submits the approved bundle; a node whose key is
not registered is refused; a run of an unsigned bundle that would copy each node's data is
refused by every node, with one line on its console, before any of its code runs; three
institutions train two rounds of DP-SGD under authenticated secure aggregation; the SuperLink is
stopped after the first round and started again, and the run ends with both rounds in the
registry, each once, and in each node's ledger.

Then the coordinator turns malicious, on the same SuperLink and nodes. It submits the approved
bundle with only a signature by a key no institution trusts: every node refuses it. Its
ServerApp process (``flwr-serverapp``, on the coordinator's machine, whose code no node can
check) runs the real secure-aggregation driver altered in what it relays
(tests/deploy_attacks.py). One run swaps gamma's public keys for its own in what alpha
receives: alpha refuses the round and the others finish it without alpha. One shows the nodes
different survivor sets: every node refuses to unmask, and the coordinator gets no share. Each
refusal is one line on the institution's console. The SuperLink, SuperNodes and ClientApps
are Flower's and fedaiot's, untouched; the double is installed through ``sitecustomize``
(tests/coordinator_double/), which reaches a process Flower spawns without patching Flower.
tests/test_malicious_coordinator.py plays the same doubles in-process, with more detail (5-node
split views, an unauthenticated round).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.bundle import approve, read_bundle
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.institution_keys import REVIEW_KEY, init_node, pin
from fedaiot.launch.processes import free_port, stop_tree
from fedaiot.node.local_data import load_local
from fedaiot.privacy.accounting import epsilon_prv
from fedaiot.privacy.ledger import dataset_fingerprint, ledger_path
from fedaiot.registry.signing import load_public_key
from fedaiot.registry.store import ModelRegistry
from fedaiot.secagg import Roster
from fedaiot.tasks import get_task
from tests.deploy_attacks import ATTACKS, double_env, submit_unsigned
from tests.deploy_support import federation
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
FEDAIOT = [sys.executable, "-m", "fedaiot"]
INSTITUTIONS = ["alpha", "beta", "gamma"]
EPSILON = 1.0
TIMEOUT = 900.0


class Processes:
    """Every process tree this test starts, stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as handle:
            process = subprocess.Popen(
                [*FEDAIOT, *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            stop_tree(process)


@pytest.fixture
def processes() -> Iterator[Processes]:
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.stop_all()


def _wait_for(
    what: str, check: Any, timeout: float = TIMEOUT, logs: Sequence[Path] = (), poll: float = 0.5
) -> Any:
    try:
        return wait_until(check, what, timeout=timeout, poll=poll)
    except AssertionError as exc:
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.exists())
        raise AssertionError(f"{exc}\n{tails}") from None


def _crash(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the coordinator's whole tree, the SuperLink first: no graceful shutdown."""
    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    tree.sort(key=lambda p: "flower-superlink" not in " ".join(_cmdline(p)))
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=10)
    process.poll()


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return list(process.cmdline())
    except psutil.Error:
        return []


def registered(log: Path) -> bool:
    """Whether the coordinator has registered every key: it submits the run only after. (Its
    first lines, "institution NAME: approved ...", come before the SuperLink is even up.)"""
    return "submitted run " in log.read_text()


def _rounds(run: Path) -> list[int]:
    journal = run / "journal.jsonl"
    if not journal.exists():
        return []
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    return [e["round"] for e in events if e["event"] == "round"]


def test_deployment_tls_node_auth_dp_secagg_restart(tmp_path: Path, processes: Processes) -> None:
    started = time.perf_counter()
    # Each institution makes its keys, the coordinator approves the requests, every
    # institution pins the roster and approves the bundle (tests/deploy_support.py).
    fed = federation(tmp_path, INSTITUTIONS, bundle=True)
    pki, kits = fed.pki, fed.kits
    # An institution the coordinator never registered: it has the CA, so TLS succeeds.
    rogue = tmp_path / "other" / "rogue"
    init_node(rogue, "rogue")
    shutil.copy(pki / "ca.crt", tmp_path / "other" / "ca.crt")
    rogues = Roster.from_lines({"rogue": (rogue / "identity.pub").read_text()})
    (tmp_path / "other" / "roster.json").write_text(rogues.to_json())
    pin(rogue, tmp_path / "other" / "roster.json", tmp_path / "other" / "ca.crt")

    cfg = RunConfig(task="breast-cancer", num_rounds=2, epsilon=EPSILON, output_dir="unused")
    files = dict(zip(INSTITUTIONS, export(cfg, 3, tmp_path / "data", INSTITUTIONS), strict=True))
    run_config = tmp_path / "run.toml"
    run_config.write_text(f'task = "breast-cancer"\nnum-rounds = 2\nepsilon = {EPSILON}\n')
    port = free_port()
    superlink = f"127.0.0.1:{port}"

    # 1. Off-schema data is refused before anything starts, naming the column.
    header, *rows = files["alpha"].read_text().splitlines()
    bad = tmp_path / "bad" / "data.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join([header.replace("mean radius", "radius"), *rows]) + "\n")
    node = ["node", "start", "--task", "breast-cancer", "--superlink", superlink]
    refused = subprocess.run(
        [*FEDAIOT, *node, "--data", str(bad), "--kit", str(kits["alpha"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert "missing column 'mean radius'" in refused.stderr
    assert "unexpected column 'radius'" not in refused.stderr  # one fault, one line
    assert len(refused.stderr.strip().splitlines()) == 1

    # 2. The coordinator: SuperLink with TLS, node authentication and a state database.
    state = tmp_path / "state"
    coordinator = [
        "coordinator", "start", "--run-config", str(run_config), "--pki", str(pki),
        "--state", str(state), "--port", str(port), "--json",
        "--bundle", str(fed.bundle), "--approval", str(fed.approvals),
    ]  # fmt: skip
    first_log = tmp_path / "coordinator-1.log"
    first = processes.start(coordinator, first_log)
    _wait_for(
        "the institutions' registration",
        lambda: registered(first_log),
        timeout=300,
        logs=[first_log, state / "superlink.log"],
    )

    # 3. A node with an unregistered key is refused at once.
    rogue_log = tmp_path / "rogue.log"
    rogue_node = processes.start(
        [*node, "--data", str(files["alpha"]), "--kit", str(rogue), "--port", str(free_port())],
        rogue_log,
    )
    assert rogue_node.wait(timeout=300) == 1, rogue_log.read_text()
    assert "public key is not registered" in rogue_log.read_text()

    # 4. Three institutions, each with its own file, key and ledger next to its data.
    node_logs = []
    for name in INSTITUTIONS:
        log = tmp_path / f"node-{name}.log"
        node_logs.append(log)
        kit = str(kits[name])
        data = str(files[name])
        processes.start([*node, "--data", data, "--kit", kit, "--port", str(free_port())], log)
    run = state / "runs" / "breast-cancer"
    logs = [first_log, state / "superlink.log", *node_logs]
    roster = Roster.load(pki / "roster.json").fingerprint
    for name, log in zip(INSTITUTIONS, node_logs, strict=True):
        _wait_for(f"{name}'s start", lambda log=log: "in roster" in log.read_text(), logs=logs)
        assert f"{name} in roster {roster}" in log.read_text()
        assert f"runs app bundles signed by {name}-review only" in log.read_text()

    # 4b. A coordinator that skips the approval: every node refuses, none of its code runs.
    loot = tmp_path / "loot"
    loot.mkdir()
    unsigned = submit_unsigned(tmp_path, state, loot)
    said = f"refused run {unsigned}: its app bundle carries no signature (trusted: "
    for log in node_logs:
        _wait_for("the refusal", lambda log=log: said in log.read_text(), logs=logs)
        assert sum(said in line for line in log.read_text().splitlines()) == 1
    answers = _wait_for(
        "the unsigned run's end", lambda: (loot / "server.json").exists(), logs=logs
    )
    assert answers
    assert len(json.loads((loot / "server.json").read_text())) >= 3
    assert "ran" not in json.loads((loot / "server.json").read_text())
    assert sorted(p.name for p in loot.iterdir()) == ["server.json"]  # no data was copied
    _wait_for("round 1", lambda: 1 in _rounds(run), logs=logs, poll=0.1)
    round_one = time.perf_counter()

    # 5. Crash the SuperLink (and its ServerApp) mid-run, and start it again.
    _crash(first)
    assert ModelRegistry(run / "registry").versions()[0] == "breast-cancer-r0001"
    second_log = tmp_path / "coordinator-2.log"
    second = processes.start(coordinator, second_log)
    assert second.wait(timeout=TIMEOUT) == 0, second_log.read_text()[-3000:]
    wall = time.perf_counter() - started
    summary: dict[str, Any] = json.loads(second_log.read_text().strip().splitlines()[-1])
    assert (summary["status"], summary["rounds"]) == ("completed", 2)

    # No finished round lost, none run twice; every round securely aggregated.
    assert _rounds(run) == [1, 2]
    events = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["resumed_after"] for s in starts] == [0, 1]
    rounds = [e for e in events if e["event"] == "round"]
    assert rounds[0]["secure_aggregation"]["error"] == ""
    assert rounds[0]["secure_aggregation"]["dropped"] == {}
    assert "confirm" in rounds[0]["stage_seconds"]  # authenticated: survivor sets confirmed
    assert [r["status"] for r in rounds[0]["replies"]] == ["trained"] * 3
    # A node caught mid-round 2 by the crash is asked again. The crash came right after round 1
    # was registered, before any node's round-2 update (its masked vector) could leave it, so
    # each retrains afresh under the charge it already paid: nobody pays twice. (A node whose
    # update had left would train afresh under a new charge, or refuse if that overran.)
    assert [r["status"] for r in rounds[1]["replies"]] == ["trained"] * 3
    assert rounds[1]["secure_aggregation"]["dropped"] == {}
    assert rounds[1]["secure_aggregation"]["error"] == ""

    # The registry's new version, signed with the provisioned key.
    registry = ModelRegistry(run / "registry")
    assert registry.versions() == ["breast-cancer-r0001", "breast-cancer-r0002"]
    assert registry.refs()["latest"] == "breast-cancer-r0002" == summary["model_version"]
    _, manifest = registry.load(
        "breast-cancer-r0002", load_public_key(pki / "coordinator" / "coordinator.pub")
    )
    assert manifest.round == 2 and manifest.task == "breast-cancer"
    assert [n.id for n in manifest.nodes] == INSTITUTIONS
    assert summary["accuracy"] > 0.5

    # Each node's ledger lives with its data and accounts both rounds within the budget.
    for name in INSTITUTIONS:
        raw = load_local(get_task("breast-cancer"), files[name])
        ledger_file = ledger_path(files[name].parent / ".fedaiot", dataset_fingerprint(raw))
        ledger = json.loads(ledger_file.read_text())
        # Round 2 is charged once, however many times it was asked for.
        assert [entry["round"] for entry in ledger["rounds"]] == [1, 2]
        spent = ledger["rounds"][-1]["epsilon"]
        assert 0 < spent <= EPSILON
        delta = ledger["rounds"][-1]["delta"]
        history = [tuple(h) for h in ledger["history"]]
        assert epsilon_prv(history, delta) == pytest.approx(spent, rel=0.01)
        node_privacy = next(n for n in manifest.nodes if n.id == name)
        assert node_privacy.epsilon == pytest.approx(spent)
        shown = subprocess.run(
            [*FEDAIOT, "ledger", "show", str(ledger_file)], capture_output=True, text=True
        )
        assert shown.returncode == 0
        assert json.loads(shown.stdout)["epsilon"] == pytest.approx(spent)

    # 6. One-round runs of a coordinator gone bad, on the same SuperLink and nodes; each
    # institution's console says each refusal once.
    honest_end = time.perf_counter()

    def one_round(kind: str, approvals: Path, env: dict[str, str]) -> tuple[str, Path]:
        config = tmp_path / f"{kind}.toml"
        config.write_text(
            f'task = "breast-cancer"\nnum-rounds = 1\nepsilon = 8.0\noutput-dir = "{kind}"\n'
        )
        args = [str(config) if a == str(run_config) else a for a in coordinator]
        args = [str(approvals) if a == str(fed.approvals) else a for a in args]
        log = tmp_path / f"coordinator-{kind}.log"
        processes.start(args, log, env=env).wait(timeout=TIMEOUT)  # it ends, one way or another
        found = re.search(r"submitted run (\d+)", log.read_text())
        assert found, log.read_text()[-3000:]
        return found.group(1), log

    # 6a. The approved bundle, but signed only by a key no institution trusts: every node
    # refuses to run it (an approval under another name is not an institution's approval).
    assert fed.bundle
    init_node(tmp_path / "mallory", "mallory")
    signed = approve(read_bundle(fed.bundle), tmp_path / "mallory" / REVIEW_KEY, "mallory")
    (tmp_path / "mallory-approvals").mkdir()
    (tmp_path / "mallory-approvals" / "mallory.json").write_text(signed.to_json())
    run_id, log = one_round("untrusted", tmp_path / "mallory-approvals", {})
    said = f"refused run {run_id}: its app bundle is signed by no key this institution trusts"
    for node_log in node_logs:
        _wait_for("the refusal", lambda n=node_log: said in n.read_text(), logs=[log])
        assert sum(said in line for line in node_log.read_text().splitlines()) == 1
    assert ModelRegistry(state / "untrusted" / "registry").versions() == []  # no model came of it

    # 6b. Its ServerApp runs the approved bundle over the real driver, altered in what it
    # relays (tests/deploy_attacks.py): the nodes' signatures and confirmations stand.
    for attack in ATTACKS:
        report = tmp_path / f"{attack.kind}.json"
        run_id, log = one_round(attack.kind, fed.approvals, double_env(attack.kind, report))
        said = f"refused a secure round of run {run_id}: "
        for name, node_log in zip(INSTITUTIONS, node_logs, strict=True):
            if name not in attack.refused_by:
                continue
            seen = lambda n=node_log, s=said: s in n.read_text()  # noqa: E731
            _wait_for(f"{name}'s refusal", seen, logs=[log])
            lines = [x for x in node_log.read_text().splitlines() if x.startswith(said)]
            assert len(lines) == 1 and attack.says in lines[0], lines
            assert f"({name}) refuses" in lines[0]
        for name, node_log in zip(INSTITUTIONS, node_logs, strict=True):
            refused = said in node_log.read_text()
            assert refused == (name in attack.refused_by), (name, node_log.read_text())
        answered = json.loads(report.read_text())
        assert {stage: answered.get(stage) for stage in attack.received} == attack.received
        assert json.loads(log.read_text().strip().splitlines()[-1])["status"] == attack.status

    print(
        f"\ndeployment e2e: {wall:.0f} s to the honest run's end, round 1 done after "
        f"{round_one - started:.0f} s, restart to end {honest_end - round_one:.0f} s, "
        f"attacks {time.perf_counter() - honest_end:.0f} s"
    )
