"""Real deployment on 127.0.0.1: a SuperLink and three SuperNodes, TLS and node authentication.

One flow, to pay Flower's start-up once: the federation is set up as deployment does it (each
institution's keys, the coordinator's approval, pinned rosters, an approved bundle); a node
with an off-schema file is refused before it starts; the coordinator starts the SuperLink and
registers the institutions; a node whose key is not registered is refused; three institutions
train twenty rounds of DP-SGD under authenticated secure aggregation on the kits' fast paths;
the coordinator is stopped with Ctrl-C after the first round (none of its processes is left),
started again, crashed (SIGKILL, the SuperLink first) and started a third time, and the run
ends with every round in the registry, each once, and in each node's ledger. Then each
institution's kit is stopped a different way (Ctrl-C, SIGTERM, SIGKILL of the kit alone):
none leaves a process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedaiot.config.run import RunConfig
from fedaiot.deploy.demo_data import export
from fedaiot.deploy.institution_keys import node_keypair
from fedaiot.deploy.provision import NODE_KEY, NODE_PUB, write_file
from fedaiot.launch.processes import free_port, stop_tree
from fedaiot.privacy.accounting import epsilon_prv
from fedaiot.registry.signing import load_public_key
from fedaiot.registry.store import ModelRegistry
from tests.deploy_support import federation
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
FEDAIOT = [sys.executable, "-m", "fedaiot"]
INSTITUTIONS = ["alpha", "beta", "gamma"]
EPSILON = 1.0
ROUNDS = 20
TIMEOUT = 900.0
PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def _interruptible() -> None:
    """Ctrl-C as an operator's terminal delivers it, even when the suite itself runs in the
    background (a shell starts background jobs with SIGINT ignored, and children inherit it).
    And SIGTERM once the test's process is gone (Linux's parent-death signal): a suite killed
    from outside, whose clean-up never runs, must not leave kits running; each stops its
    whole tree on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
                preexec_fn=_interruptible,
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


SUPERLINK = ("flower-superlink", "fedaiot.launch.fast_superlink")


def _crash(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the coordinator's whole tree, the SuperLink first: no graceful shutdown."""
    root = psutil.Process(process.pid)
    tree = [root, *root.children(recursive=True)]
    tree.sort(key=lambda p: not any(w.endswith(SUPERLINK) for w in _cmdline(p)))
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


def start_coordinator(
    processes: Processes, args: list[str], log: Path, state: Path
) -> subprocess.Popen[bytes]:
    """The coordinator's kit, started and waited for until it has registered every key."""
    kit = processes.start(args, log)
    _wait_for(
        "the institutions' registration",
        lambda: registered(log),
        timeout=300,
        logs=[log, state / "superlink.log"],
    )
    return kit


def _rounds(run: Path) -> list[int]:
    journal = run / "journal.jsonl"
    if not journal.exists():
        return []
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    return [e["round"] for e in events if e["event"] == "round"]


def _tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def _serving_tree(kit: subprocess.Popen[bytes], logs: Sequence[Path]) -> list[psutil.Process]:
    """The coordinator's kit, its SuperLink, the SuperLink's SuperExec and the ServerApp."""
    return _wait_for(
        "the ServerApp", lambda: tree if len(tree := _tree(kit)) >= 4 else None, logs=logs
    )


def _gone(members: Sequence[psutil.Process]) -> bool:
    """Whether none of ``members`` runs any more (a zombie waits for its reaper only)."""
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                return False
    return True


def test_deployment_tls_node_auth_dp_secagg_restart(tmp_path: Path, processes: Processes) -> None:
    started = time.perf_counter()
    fed = federation(tmp_path, INSTITUTIONS, bundle=True)
    # alpha's kit with a node key the coordinator never registered: TLS still succeeds
    rogue = tmp_path / "rogue"
    shutil.copytree(fed.kits["alpha"], rogue)
    private, public = node_keypair("rogue")
    write_file(rogue / NODE_KEY, private, secret=True, force=True)
    write_file(rogue / NODE_PUB, public, secret=False, force=True)

    cfg = RunConfig(task="breast-cancer", num_rounds=ROUNDS, epsilon=EPSILON, output_dir="unused")
    files = dict(zip(INSTITUTIONS, export(cfg, 3, tmp_path / "data", INSTITUTIONS), strict=True))
    run_config = tmp_path / "run.toml"
    run_config.write_text(f'task = "breast-cancer"\nnum-rounds = {ROUNDS}\nepsilon = {EPSILON}\n')
    port = free_port()
    superlink = f"127.0.0.1:{port}"

    # 1. Off-schema data is refused before anything starts, naming the column.
    header, *rows = files["alpha"].read_text().splitlines()
    bad = tmp_path / "bad" / "data.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join([header.replace("mean radius", "radius"), *rows]) + "\n")
    node = ["node", "start", "--task", "breast-cancer", "--superlink", superlink]
    refused = subprocess.run(
        [*FEDAIOT, *node, "--data", str(bad), "--kit", str(fed.kits["alpha"])],
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
        "coordinator", "start", "--run-config", str(run_config), "--pki", str(fed.pki),
        "--bundle", str(fed.bundle), "--approval", str(fed.approvals),
        "--state", str(state), "--port", str(port), "--json",
    ]  # fmt: skip
    first_log = tmp_path / "coordinator-1.log"
    first = start_coordinator(processes, coordinator, first_log, state)

    # 3. A node with an unregistered key is refused at once.
    rogue_log = tmp_path / "rogue.log"
    rogue_node = processes.start(
        [*node, "--data", str(files["alpha"]), "--kit", str(rogue), "--port", str(free_port())],
        rogue_log,
    )
    assert rogue_node.wait(timeout=300) == 1, rogue_log.read_text()
    assert "public key is not registered" in rogue_log.read_text()

    # 4. Three institutions, each with its own file, key and ledger next to its data.
    node_logs, nodes = [], {}
    for name in INSTITUTIONS:
        log = tmp_path / f"node-{name}.log"
        node_logs.append(log)
        args = ["--data", str(files[name]), "--kit", str(fed.kits[name]), "--port"]
        nodes[name] = processes.start([*node, *args, str(free_port())], log)
    run = state / "runs" / "breast-cancer"
    logs = [first_log, state / "superlink.log", *node_logs]
    _wait_for("round 1", lambda: 1 in _rounds(run), logs=logs, poll=0.05)
    round_one = time.perf_counter()

    # 5. Ctrl-C the coordinator's kit mid-run: it stops the SuperLink, its SuperExec and the
    # ServerApp. Start it again, crash the SuperLink (and its ServerApp) mid-run, and start
    # it a third time.
    first_tree = _serving_tree(first, logs)
    first.send_signal(signal.SIGINT)
    _wait_for("the interrupted coordinator's processes to end", lambda: _gone(first_tree))
    assert first.wait(timeout=60) != 0
    assert ModelRegistry(run / "registry").versions()[0] == "breast-cancer-r0001"
    interrupted = max(_rounds(run))
    logs += [tmp_path / "coordinator-2.log", tmp_path / "coordinator-3.log"]
    second = processes.start(coordinator, logs[-2])
    _wait_for("a round after the restart", lambda: max(_rounds(run)) > interrupted, logs=logs)
    _crash(second)
    third_log = logs[-1]
    third = processes.start(coordinator, third_log)
    coordinator_tree = _serving_tree(third, logs)
    assert third.wait(timeout=TIMEOUT) == 0, third_log.read_text()[-3000:]
    wall = time.perf_counter() - started
    summary: dict[str, Any] = json.loads(third_log.read_text().strip().splitlines()[-1])
    assert (summary["status"], summary["rounds"]) == ("completed", ROUNDS)
    _wait_for("the coordinator's processes to end", lambda: _gone(coordinator_tree))

    # No finished round lost, none run twice; every round securely aggregated.
    assert _rounds(run) == list(range(1, ROUNDS + 1))
    events = [json.loads(x) for x in (run / "journal.jsonl").read_text().splitlines()]
    resumed = [e["resumed_after"] for e in events if e["event"] == "start"]
    assert len(resumed) == 3 and resumed[0] == 0 < resumed[1] < resumed[2], resumed
    rounds = [e for e in events if e["event"] == "round"]
    for played in rounds:
        assert played["secure_aggregation"]["error"] == "", played
        assert played["secure_aggregation"]["dropped"] == {}, played
        assert [r["status"] for r in played["replies"]] == ["trained"] * 3
    # after the first round of each coordinator, the keys and shares come ahead: train and mask
    # (with the next round's keys), confirm the survivor sets, unmask (with its shares)
    ahead = [r for r in rounds if r["secure_aggregation"]["shares_ahead"]]
    assert len(ahead) >= ROUNDS - len(resumed) and all(r["exchanges"] == 3 for r in ahead)
    assert all("confirm" in r["stage_seconds"] for r in rounds)

    # The registry's new version, signed with the provisioned key.
    registry = ModelRegistry(run / "registry")
    assert registry.versions() == [f"breast-cancer-r{i:04d}" for i in range(1, ROUNDS + 1)]
    assert registry.refs()["latest"] == f"breast-cancer-r{ROUNDS:04d}" == summary["model_version"]
    _, manifest = registry.load(
        f"breast-cancer-r{ROUNDS:04d}", load_public_key(fed.pki / "coordinator" / "coordinator.pub")
    )
    assert manifest.round == ROUNDS and manifest.task == "breast-cancer"
    assert [n.id for n in manifest.nodes] == INSTITUTIONS
    assert summary["accuracy"] > 0.5

    # Each node's ledger lives with its data and accounts every round within the budget; the
    # institution saw each round on its console.
    for name in INSTITUTIONS:
        (ledger_file,) = (files[name].parent / ".fedaiot").rglob("ledger-*.json")
        ledger = json.loads(ledger_file.read_text())
        assert sorted({entry["round"] for entry in ledger["rounds"]}) == list(range(1, ROUNDS + 1))
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
        console = (tmp_path / f"node-{name}.log").read_text()
        assert f"round {ROUNDS}" in console and f"of {EPSILON:.3f}" in console
        assert "the kit's warm ClientApp runtime" in console

    # 6. Stopping a kit, whichever way, leaves none of its processes: Ctrl-C, SIGTERM, and
    # SIGKILL of the kit alone, left unreaped (its SuperNode and runner see it gone).
    trees = {name: _tree(process) for name, process in nodes.items()}
    assert all(len(tree) >= 3 for tree in trees.values())  # kit, SuperNode, runner
    nodes["alpha"].send_signal(signal.SIGINT)
    nodes["beta"].send_signal(signal.SIGTERM)
    nodes["gamma"].kill()
    for name, tree in trees.items():
        _wait_for(f"{name}'s processes to end", lambda tree=tree: _gone(tree), logs=logs)
    print(
        f"\ndeployment e2e: {wall:.0f} s in all for {ROUNDS} rounds, round 1 done after "
        f"{round_one - started:.0f} s, restart to end {time.perf_counter() - round_one:.0f} s"
    )
