"""Flower 1.41's hard-coded waits, replaced at process start, without editing Flower's files.

Every patch here rebinds a module-global name or a keyword default inside Flower, in the
process that applies it, before Flower's code runs. Each is checked first: the installed Flower
must be the version the patch was verified against (:data:`VERIFIED`), and the names it
replaces must look as they did then (the module's ``time``, the literal waits in the source,
the keyword defaults). Anything else and the patch is not applied: Flower keeps its own
behaviour and a warning says why. Nothing here starts a process.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from fedaiot.config.polling import Polling

VERIFIED = "1.41.0"  # tests/test_flower_patches.py runs every patch against this version
LOG = logging.getLogger("fedaiot.launch")

# Flower's waits, as they read in flwr/supernode/start_client_internal.py (1.41.0).
IDLE_WAIT, REPLY_WAIT = 3, 0.5
# The SuperLink's sweep of expired task tokens runs at most this often. Flower runs it inside
# every request a node or the ServerApp makes (two UPDATEs each, a quarter of the SuperLink's
# CPU in a round); a token expires 60 s after its last heartbeat, so a sweep a second late
# changes nothing a node or a run can see.
TOKEN_SWEEP_EVERY = 1.0


def log_to_stderr() -> None:
    """The kit's own messages on stderr (the node's log), and only them: a handler on the root
    logger would also print httpx's line for every poll, ten a second."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    kit = logging.getLogger("fedaiot")
    kit.addHandler(handler)
    kit.setLevel(logging.INFO)


def flower_version() -> str:
    from flwr.supercore.version import package_version

    return str(package_version)


def unverified(version: str | None = None) -> str:
    """Why this Flower may not be patched ("" when it may)."""
    found = flower_version() if version is None else version
    if found != VERIFIED:
        return (
            f"Flower {found} is installed, the kit's fast paths were verified against "
            f"{VERIFIED} only: running Flower's stock behaviour (slower rounds)"
        )
    return ""


def _refuse(why: str) -> bool:
    LOG.warning("fedaiot: %s", why)
    return False


class PacedTime(types.ModuleType):
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its two fixed waits
    become the configured ones, and every other use of ``time`` is the real module."""

    def __init__(self, polling: Polling) -> None:
        super().__init__("time")
        self._waits = {float(IDLE_WAIT): polling.fleet, REPLY_WAIT: polling.reply}

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(self._waits.get(float(seconds), seconds))


def patch_supernode(polling: Polling, on_message: Callable[[], None] | None = None) -> bool:
    """The SuperNode's idle wait (3 s) and reply waits (0.5 s) become ``polling``'s; with
    ``on_message``, it is called each time a message has been pulled and stored (the kit's
    runner is woken by it instead of polling for tasks).

    And a reply left over is pushed without waiting for the next message. Flower's loop pushes
    replies only after it pulled a message, one at a time: a reply the ClientApp stored while
    the SuperLink was down (a crash mid-round) is pushed after the next message instead of that
    message's own reply, and from then on every reply leaves one message late, after the
    coordinator stopped waiting for it (seen in the deployment end-to-end test: every round
    after the restart failed at its first exchange)."""
    if why := unverified():
        return _refuse(why)
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    expected = [f"time.sleep({IDLE_WAIT})", f"time.sleep({REPLY_WAIT})"]
    if loop.time is not time or not all(wait in source for wait in expected):
        return _refuse("Flower's SuperNode loop is not the one verified: its waits stay")
    loop.time = PacedTime(polling)
    pull = loop._pull_and_store_message

    def pull_or_push(*args: Any, **kwargs: Any) -> int | None:
        run_id: int | None = pull(*args, **kwargs)
        if run_id is not None:
            if on_message is not None:
                on_message()
            return run_id
        if reply_waiting(kwargs.get("state")):
            return 0  # not None: the loop pushes the replies waiting, then pulls again
        return None

    loop._pull_and_store_message = pull_or_push
    return True


def reply_waiting(state: Any) -> bool:
    """Whether the SuperNode's state holds a reply no push has taken yet (Flower 1.41's
    in-memory node state; any other state: False, Flower's own behaviour)."""
    lock, store = getattr(state, "lock_msg_store", None), getattr(state, "msg_store", None)
    if lock is None or not isinstance(store, dict):
        return False
    with lock:
        return any(
            not entry.is_retrieved and entry.message.metadata.reply_to_message_id
            for entry in store.values()
        )


def patch_object_pulls(polling: Polling) -> bool:
    """The first retry of an object that is not there yet comes after ``polling.object_retry``
    instead of 1 s (then doubling, as Flower does). Flower's functions take the wait as a
    keyword default, bound when they were defined: the defaults themselves are replaced."""
    if why := unverified():
        return _refuse(why)
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF
    from flwr.supercore.inflatable import inflatable_utils as pulls

    functions = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    for function in functions:
        defaults = function.__kwdefaults__ or {}
        if defaults.get("initial_backoff") not in (PULL_INITIAL_BACKOFF, polling.object_retry):
            return _refuse(f"{function.__name__} is not the one verified: its retries stay")
    for function in functions:
        assert function.__kwdefaults__ is not None
        function.__kwdefaults__["initial_backoff"] = polling.object_retry
    return True


def patch_clientapp_loading(app_module: str) -> bool:
    """In a runner that imported the institution's own ClientApp (``app_module``) before any
    task: Flower loads it from ``sys.modules`` instead of the run's FAB folder, and the FAB
    folder is not put on ``sys.path``, so nothing of the FAB's code is imported. A FAB that
    names another ClientApp fails to load (Flower's error reply), it never runs."""
    if why := unverified():
        return _refuse(why)
    import sys

    from flwr.supercore import object_ref

    if app_module not in sys.modules or not callable(getattr(object_ref, "_ensure_sys_path", 0)):
        return _refuse("Flower's app loader is not the one verified: the FAB's app is loaded")
    object_ref._ensure_sys_path = lambda directory: None
    return True


def patch_fab_install() -> bool:
    """Flower's ClientApp process unzips the run's FAB and checks every file's hash for every
    message (0.5 to 1 s), then finds it already installed. In the kit's runner a FAB whose
    folder is already installed under this node's Flower home is taken as it is, as Flower
    itself takes an existing folder; a new FAB is installed by Flower's code. The SuperNode
    checked the FAB's hash and its signatures before storing the run."""
    if why := unverified():
        return _refuse(why)
    from flwr.cli import install
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as task

    original = task.install_from_fab
    if original is not install.install_from_fab:
        return _refuse("Flower's ClientApp process is not the one verified: it installs the FAB")

    def install_once(fab_file: Any, install_dir: Any = None, skip_prompt: bool = False) -> Any:
        if isinstance(fab_file, bytes) and install_dir is None and skip_prompt:
            short = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
            for folder in (get_flwr_home() / APP_DIR).glob(f"*.{short}"):
                if (folder / "pyproject.toml").is_file():
                    return folder
        return original(fab_file, install_dir, skip_prompt)

    task.install_from_fab = install_once
    return True


def patch_token_sweep(every: float = TOKEN_SWEEP_EVERY) -> bool:
    """In a SuperLink: its sweep of expired task tokens runs at most once every ``every``
    seconds instead of inside every request (the requests themselves run as Flower wrote
    them). The sweep that does run is Flower's own."""
    if why := unverified():
        return _refuse(why)
    from flwr.supercore.corestate import sql_corestate
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweep = SqlCoreState.__dict__.get("_cleanup_expired_task_tokens")
    source = inspect.getsource(sql_corestate)
    if not callable(sweep) or "TaskModel.active_until < expired_at" not in source:
        return _refuse("Flower's task-token sweep is not the one verified: it runs every request")
    lock = threading.Lock()
    last = [-math.inf]

    def sweep_now_and_then(self: Any) -> None:
        with lock:
            if time.monotonic() - last[0] < every:
                return
            sweep(self)
            last[0] = time.monotonic()

    SqlCoreState._cleanup_expired_task_tokens = sweep_now_and_then  # type: ignore[method-assign]
    return True


# The SuperLink's HTTP middlewares (flwr/superlink/main.py, 1.41.0), outermost first, and which
# of them pass a request through untouched: a Control API one outside /v1/control/, node
# authentication outside /v1/fleet/, tracing unless FLWR_TRACING_ENABLED=1, the Fleet event
# log without its plugin. Each is a Starlette BaseHTTPMiddleware, whose task group and streams
# cost more per request than most handlers.
MIDDLEWARE = (
    "ControlSensitiveResponseMiddleware",
    "BaseHTTPMiddleware",  # Flower's error translator
    "ControlAuthenticationMiddleware",
    "ControlLicenseMiddleware",
    "ProtobufTranslationMiddleware",
    "RuntimeTracingMiddleware",
    "ControlEventLogMiddleware",
    "NodeAuthMiddleware",
    "FleetEventLogMiddleware",
)
CONTROL, FLEET = "/v1/control/", "/v1/fleet/"
_PATH = "fedaiot.path"  # the request's path, kept in its ASGI scope by the first gate


def _path(scope: Any) -> str:
    """The path as the middlewares read it (``request.url.path``), built once a request: up
    to six gates ask for it."""
    path = scope.get(_PATH)
    if path is None:
        from starlette.datastructures import URL

        path = scope[_PATH] = URL(scope=scope).path
    return str(path)


def _outside_control(scope: Any) -> bool:
    return not _path(scope).startswith(CONTROL)


def _outside_fleet(scope: Any) -> bool:
    return not _path(scope).startswith(FLEET)


def _tracing_off(scope: Any) -> bool:
    return os.getenv("FLWR_TRACING_ENABLED") != "1"


def _no_fleet_log(scope: Any) -> bool:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "fleet_event_log_plugin", None) is None


PASSES = {
    "ControlSensitiveResponseMiddleware": _outside_control,
    "ControlAuthenticationMiddleware": _outside_control,
    "ControlLicenseMiddleware": _outside_control,
    "ControlEventLogMiddleware": _outside_control,
    "NodeAuthMiddleware": _outside_fleet,
    "RuntimeTracingMiddleware": _tracing_off,
    "FleetEventLogMiddleware": _no_fleet_log,
}


class Bypass:
    """A pure ASGI wrapper: a request ``passes`` says the middleware would hand through
    untouched goes straight to the app inside it; every other request goes through it."""

    def __init__(self, app: Any, *, middleware: Any, passes: Callable[[Any], bool]) -> None:
        self.app, self.wrapped, self.passes = app, middleware(app), passes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and self.passes(scope):
            await self.app(scope, receive, send)
        else:
            await self.wrapped(scope, receive, send)


def patch_superlink_middleware() -> bool:
    """In a SuperLink: the middlewares that would hand a request through untouched are
    bypassed for it (:data:`PASSES`); error and protobuf translation run for every request,
    node authentication for every Fleet request, as Flower wrote them."""
    if why := unverified():
        return _refuse(why)
    from flwr.superlink import main
    from flwr.superlink.routers.control import middlewares as control
    from starlette.middleware import Middleware

    original = main._get_middleware
    stack = original()
    own = stack[len(stack) - len(MIDDLEWARE) :]
    names = tuple(getattr(m.cls, "__name__", "") for m in own)
    sensitive = all(path.startswith(CONTROL) for _, path in control.CONTROL_SENSITIVE_ROUTE_KEYS)
    if names != MIDDLEWARE or not sensitive:
        return _refuse("Flower's SuperLink middlewares are not the ones verified: all run")

    def fewer_passes() -> list[Any]:
        stack = original()
        for index, item in enumerate(stack):
            passes = PASSES.get(getattr(item.cls, "__name__", ""))
            if passes is not None and not item.args and not item.kwargs:
                stack[index] = Middleware(Bypass, middleware=item.cls, passes=passes)
        return stack

    main._get_middleware = fewer_passes
    return True
