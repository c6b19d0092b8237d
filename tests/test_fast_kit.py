"""The kits' fast paths without a federation: the poll settings, the version-checked patches of
Flower's waits (refused, with a warning, on a Flower they were not verified against), the
ServerApp's reply loop, and the node launcher's choice between the kit's runtime and Flower's.

Patches rebind names inside Flower's modules; every test that applies one registers the
original with ``monkeypatch`` first, so it is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedaiot.config.polling import ENV, Polling, PollingError
from fedaiot.launch import flower_patches
from fedaiot.launch import supernode as launcher
from fedaiot.rounds.exchanges import CountingGrid, ReplyLoop, serverapp_grid
from tests.waiting import CEILING, wait_until


def test_polling_travels_through_the_environment() -> None:
    polling = Polling(fleet=0.25, results=0.02)
    env = polling.to_env()
    assert Polling.from_env(env) == polling
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.5"  # Flower's own supported knob
    stock = Polling(mode="stock")
    assert Polling.from_env(stock.to_env()).stock
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL" not in stock.to_env()  # Flower's default stays
    assert Polling.from_env({}) == Polling()
    with pytest.raises(PollingError, match="fleet"):
        Polling.from_env({ENV: '{"fleet": 0}'})


def test_an_unknown_flower_version_is_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert flower_patches.unverified() == ""  # the installed Flower is the verified one
    why = flower_patches.unverified("1.99.0")
    assert "Flower 1.99.0" in why and flower_patches.VERIFIED in why and "stock" in why
    monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.99.0")
    from flwr.supercore.inflatable import inflatable_utils as pulls

    before = dict(pulls.pull_objects.__kwdefaults__ or {})
    with caplog.at_level(logging.WARNING, logger="fedaiot.launch"):
        assert not flower_patches.patch_object_pulls(Polling())
        assert not flower_patches.patch_supernode(Polling())
        assert not flower_patches.patch_fab_install()
        assert not flower_patches.patch_token_sweep()
        assert not flower_patches.patch_superlink_middleware()
    assert pulls.pull_objects.__kwdefaults__ == before  # nothing was touched
    assert len([r for r in caplog.records if "1.99.0" in r.getMessage()]) == 5


def test_the_superlink_bypasses_only_middlewares_that_would_pass_a_request_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from flwr.superlink import main

    monkeypatch.setattr(main, "_get_middleware", main._get_middleware)
    assert flower_patches.patch_superlink_middleware()
    stack = main._get_middleware()
    bypassed = {m.kwargs["middleware"].__name__ for m in stack if m.cls is flower_patches.Bypass}
    assert bypassed == set(flower_patches.PASSES)
    kept = [m.cls.__name__ for m in stack if m.cls is not flower_patches.Bypass]
    # error and protobuf translation run for every request
    assert kept[-2:] == ["BaseHTTPMiddleware", "ProtobufTranslationMiddleware"]
    node_auth = flower_patches.PASSES["NodeAuthMiddleware"]
    assert not node_auth({"type": "http", "path": "/v1/fleet/push-object", "headers": []})
    assert node_auth({"type": "http", "path": "/v1/runtime/push-object", "headers": []})

    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append("app")

    class Recording:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            seen.append("middleware")
            await self.inner(scope, receive, send)

    gate = flower_patches.Bypass(
        app, middleware=Recording, passes=flower_patches.PASSES["ControlAuthenticationMiddleware"]
    )
    for path in ("/v1/fleet/pull-messages", "/v1/control/start-run"):
        asyncio.run(gate({"type": "http", "path": path, "headers": []}, None, None))
    assert seen == ["app", "middleware", "app"]  # a Control request still goes through it


def test_the_superlink_sweeps_expired_tokens_now_and_then(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweeps: list[object] = []
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", sweeps.append)
    assert flower_patches.patch_token_sweep(every=3600)
    for _ in range(5):  # five requests within the interval: one sweep
        SqlCoreState._cleanup_expired_task_tokens("state")  # type: ignore[arg-type]
    assert sweeps == ["state"]
    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", sweeps.append)
    assert flower_patches.patch_token_sweep(every=0)
    for _ in range(3):
        SqlCoreState._cleanup_expired_task_tokens("state")  # type: ignore[arg-type]
    assert len(sweeps) == 4


def test_the_superlink_runs_through_the_kits_launcher_unless_stock() -> None:
    from fedaiot.launch.superlink import SuperLink

    link = SuperLink(9092, Path("state.db"))
    assert link.command()[:3] == [sys.executable, "-m", "fedaiot.launch.fast_superlink"]
    assert link.command(fast=False)[0] == "flower-superlink"
    assert link.command()[4:] == link.command(fast=False)[1:]  # the same Flower arguments
    assert link.command(parent=7)[3:6] == ["--parent-pid", "7", "--"]


STARTS_A_SUPERLINK = """
import sys, time
from pathlib import Path
from fedaiot.launch.processes import flower_env, free_port
from fedaiot.launch.superlink import SuperLink, start_superlink
home = Path(sys.argv[1])
link = SuperLink(free_port(), home / "state.db")
with (home / "superlink.log").open("wb") as log:
    process = start_superlink(link, flower_env(home), log)
print(process.pid, flush=True)
time.sleep(600)
"""


def test_a_superlink_and_its_children_stop_when_their_starter_is_killed_outright(
    tmp_path: Path,
) -> None:
    """The coordinator's kit killed with SIGKILL (no clean-up runs) must not leave its
    SuperLink serving, nor the SuperExec the SuperLink started."""
    import psutil

    starter = subprocess.Popen(
        [sys.executable, "-c", STARTS_A_SUPERLINK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    tree: list[psutil.Process] = []
    try:
        assert starter.stdout is not None
        superlink = psutil.Process(int(starter.stdout.readline()))
        tree = [superlink]
        wait_until(
            lambda: superlink.children(recursive=True), "the SuperLink's SuperExec", process=starter
        )
        tree += superlink.children(recursive=True)
        starter.kill()
        starter.wait()

        def alive(member: psutil.Process) -> bool:
            try:
                return member.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        wait_until(lambda: not any(alive(m) for m in tree), "the SuperLink's tree to stop")
    finally:
        starter.kill()
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()


def test_the_supernode_loop_waits_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)
    woken: list[int] = []
    polling = Polling(fleet=0.2, reply=0.03)
    assert flower_patches.patch_supernode(polling, on_message=lambda: woken.append(1))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    loop.time.sleep(3)  # Flower's idle wait
    loop.time.sleep(0.5)  # its reply wait
    loop.time.sleep(7)  # any other wait is left alone
    assert slept == [0.2, 0.03, 7]
    assert loop.time.monotonic is time.monotonic  # the rest of `time` is the real module


@pytest.mark.usefixtures("flower_identity")
def test_a_reply_left_over_is_pushed_without_waiting_for_the_next_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reply stored while the SuperLink was down: Flower's loop would push it only after the
    next message, and every later reply would then leave one message late."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    monkeypatch.setattr(loop, "time", loop.time)
    pulled: list[int | None] = [None, None, 7]
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda **kw: pulled.pop(0))
    woken: list[int] = []
    assert flower_patches.patch_supernode(Polling(), on_message=lambda: woken.append(1))
    state = InMemoryNodeState(ObjectStoreFactory().store())
    assert loop._pull_and_store_message(state=state) is None  # nothing pulled, nothing waiting
    ask = Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=5, message_type="query")
    ask.metadata.__dict__["_message_id"] = ask.object_id
    reply = Message(RecordDict({"c": ConfigRecord({"b": 2})}), reply_to=ask)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    for message in (ask, reply):
        state.store_message(message)
    assert loop._pull_and_store_message(state=state) == 0  # push the reply now
    assert [m.object_id for m in state.get_messages_legacy(is_reply=True)] == [reply.object_id]
    assert loop._pull_and_store_message(state=state) == 7 and woken == [1]  # a message pulled


def test_object_pulls_retry_first_after_the_configured_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.inflatable import inflatable_utils as pulls

    for function in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__ or {}))
    assert flower_patches.patch_object_pulls(Polling(object_retry=0.03))
    assert pulls.pull_objects.__kwdefaults__["initial_backoff"] == 0.03  # type: ignore[index]
    kwdefaults = pulls.pull_and_inflate_object_from_tree.__kwdefaults__
    assert kwdefaults is not None and kwdefaults["initial_backoff"] == 0.03


def test_an_installed_fab_is_not_unpacked_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hashlib

    from flwr.supernode.runtime import run_clientapp as task

    monkeypatch.setattr(task, "install_from_fab", task.install_from_fab)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert flower_patches.patch_fab_install()
    content = b"a FAB's bytes"
    short = hashlib.sha256(content).hexdigest()[:8]
    installed = tmp_path / "apps" / f"pub.app.1.0.0.{short}"
    installed.mkdir(parents=True)
    (installed / "pyproject.toml").write_text("")
    assert task.install_from_fab(content, skip_prompt=True) == installed
    with pytest.raises(Exception):  # noqa: B017 - a FAB not installed goes to Flower's code
        task.install_from_fab(b"another FAB", skip_prompt=True)


class FakeGrid(CountingGrid):
    """Replies arrive on the ``arrive_after``-th look for them."""

    def __init__(self, arrive_after: dict[str, int]) -> None:
        self.arrive_after, self.looks = arrive_after, 0

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        return list(self.arrive_after)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        self.looks += 1
        wanted = set(message_ids)
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m))
            for m, n in self.arrive_after.items()
            if m in wanted and n == self.looks
        ]


def test_the_reply_loop_returns_when_every_reply_is_in_or_at_the_timeout() -> None:
    loop = ReplyLoop(FakeGrid({"a": 1, "b": 3}), Polling(results=0.001), pack=False)
    replies = list(loop.send_and_receive([object(), object()], timeout=None))  # type: ignore[list-item]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert loop.exchanges == 1 and loop.messages == 2
    never = ReplyLoop(FakeGrid({"a": 1, "b": 10**9}), Polling(results=0.001), pack=False)
    replies = list(never.send_and_receive([object(), object()], timeout=0.05))  # type: ignore[list-item]
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]  # the rest: missing


def test_the_reply_loop_looks_soon_then_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    loop = ReplyLoop(FakeGrid({"a": 8}), Polling(results=0.05), first=0.005, pack=False)
    assert len(list(loop.send_and_receive([object()], timeout=None))) == 1  # type: ignore[list-item]
    assert slept == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.05, 0.05, 0.05])


def test_the_serverapp_grid_follows_the_kit() -> None:
    from flwr.superlink.grid import InMemoryGrid

    inner: Any = object()
    assert type(serverapp_grid(inner, Polling(mode="stock"))) is CountingGrid
    deployed = serverapp_grid(inner, Polling(results=0.05), simulation_poll=0.005)
    assert isinstance(deployed, ReplyLoop) and deployed.first == 0.05  # a look is a request
    # a simulation's look costs no request: it looks first after simulation-poll seconds
    simulated = serverapp_grid(
        InMemoryGrid.__new__(InMemoryGrid), Polling(results=0.05), simulation_poll=0.005
    )
    assert isinstance(simulated, ReplyLoop) and simulated.first == 0.005


def _node() -> launcher.SuperNode:
    return launcher.SuperNode("127.0.0.1:1", Path("ca.crt"), Path("node.key"), Path("n.toml"), 1)


def test_the_node_runs_the_kits_runtime_or_flowers_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[list[str]] = []

    def spawn(command: list[str], env: dict[str, str], log: Any, **kw: Any) -> Any:
        started.append(command)
        return subprocess.Popen(["sleep", "60"], start_new_session=True)

    monkeypatch.setattr(launcher, "spawn", spawn)
    with open(tmp_path / "log", "ab") as log:
        fast = launcher.start_supernode(_node(), {}, log, Polling())
        try:
            assert fast.runner is not None and fast.notes == []
            assert started[0][1:3] == ["-m", "fedaiot.launch.fast_supernode"]
            assert (
                "--isolation" in started[0] and started[1][2] == "fedaiot.launch.clientapp_runner"
            )
        finally:
            fast.stop()
        stock = launcher.start_supernode(_node(), {}, log, Polling(mode="stock"))
        stock.stop()
        assert stock.runner is None and started[2][0] == "flower-supernode"
        monkeypatch.setattr(flower_patches, "flower_version", lambda: "1.99.0")
        fallback = launcher.start_supernode(_node(), {}, log, Polling())
        fallback.stop()
    assert fallback.runner is None and started[3][0] == "flower-supernode"
    assert len(fallback.notes) == 1 and "Flower 1.99.0" in fallback.notes[0]
    assert all(p.poll() is not None for p in (fast.supernode, fast.runner, stock.supernode))


def test_waiting_on_a_node_stops_both_processes_when_one_stops(tmp_path: Path) -> None:
    supernode = subprocess.Popen(["sleep", "60"], start_new_session=True)
    runner = subprocess.Popen(["true"], start_new_session=True)
    ticks: list[int] = []
    node = launcher.NodeProcesses(supernode, runner)
    assert launcher.wait_supernode(node, tick=0.01, on_tick=lambda: ticks.append(1)) == 1
    assert supernode.poll() is not None and ticks  # the console was followed meanwhile


def test_the_institution_sees_each_round_on_its_console(tmp_path: Path) -> None:
    from fedaiot.node.deployed import NodeSettings
    from fedaiot.node.round_log import Follower, line, log_path, record

    settings = NodeSettings(tmp_path / "data.csv", "alpha", "breast-cancer", tmp_path / "led")
    follower = Follower(log_path(settings))
    record(settings, what="round 3", status="trained", epsilon=0.41, budget=1.0, seconds=0.52)
    record(
        settings,
        what="round 4",
        status="refused",
        reason="budget-exhausted",
        detail="epsilon 1.02 would pass the budget 1.0",
    )
    trained, refused = (line(e) for e in follower.new_events())
    assert "round 3" in trained and "trained" in trained
    assert "epsilon 0.410 of 1.000" in trained and "0.52 s" in trained
    assert "refused" in refused and "budget-exhausted: epsilon 1.02 would pass" in refused
    assert follower.new_events() == []  # each line is shown once


RUNNER_MID_TASK = """
import os, sys, time
import flwr.supernode.runtime.run_clientapp as task
from fedaiot.config.polling import Polling
from fedaiot.launch import clientapp_runner

def busy(**kwargs):  # a ClientApp in the middle of its message
    print("child", os.getpid(), flush=True)
    time.sleep(600)

task.run_clientapp = busy
runner = clientapp_runner.Runner("127.0.0.1:9", Polling(task=0.05), None, None)
tokens = iter(["a task"])
runner.acquire = lambda: next(tokens, None)
clientapp_runner.serve(runner)
print("runner stopped", flush=True)
"""


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_runner_mid_task_stops_its_child(how: signal.Signals) -> None:
    import sys

    import psutil

    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER_MID_TASK],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert runner.stdout is not None
        line = runner.stdout.readline()
        assert line.startswith("child"), line
        child = psutil.Process(int(line.split()[1]))
        runner.send_signal(how)
        assert runner.wait(timeout=120) == 0
        assert runner.stdout.read().strip() == "runner stopped"
        wait_until(lambda: not child.is_running(), "the forked child to end", timeout=60)
    finally:
        runner.kill()
        runner.wait()


CLEANS_UP = """
import sys, time
from pathlib import Path
from fedaiot.launch.signals import interrupt_once
interrupt_once(lambda signum: SystemExit(128 + signum))
marks = Path(sys.argv[1])
try:
    marks.write_text("running\\n")
    time.sleep(600)
finally:
    with marks.open("a") as out:
        out.write("cleaning\\n")
    time.sleep(2)  # a second SIGTERM lands here
    with marks.open("a") as out:
        out.write("cleaned\\n")
"""


def test_a_second_sigterm_does_not_cut_a_scripts_cleanup_short(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    script = subprocess.Popen([sys.executable, "-c", CLEANS_UP, str(marks)])
    try:
        wait_until(lambda: marks.exists(), "the script to start", process=script)
        script.send_signal(signal.SIGTERM)
        wait_until(lambda: "cleaning" in marks.read_text(), "the cleanup to start")
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=CEILING) == 128 + signal.SIGTERM
    finally:
        script.kill()
    assert marks.read_text().split() == ["running", "cleaning", "cleaned"]


def test_a_free_port_lies_below_the_outgoing_connections_range() -> None:
    import socket

    from fedaiot.launch.processes import _ephemeral_low, free_port

    for _ in range(20):
        port = free_port()
        assert 20000 <= port < _ephemeral_low()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # still free: nothing kept it
