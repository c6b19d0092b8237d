"""The attacks tests/test_deploy_e2e.py mounts on a real deployment, and what each must meet.

* A coordinator that runs a bundle the institutions never approved (:data:`MALICIOUS`), submitted
  with ``flwr run`` as any coordinator can: every SuperNode must refuse it before a line runs.
* A coordinator whose ServerApp runs the real secure-aggregation driver altered in what it relays
  (tests/coordinator_doubles.py): :func:`double_env` is the environment its ``coordinator start``
  gets, so that tests/coordinator_double/sitecustomize.py installs the double in the
  ``flwr-serverapp`` process, the one on the coordinator's machine that runs the ServerApp. The
  SuperLink, the SuperNodes and the ClientApps are untouched: only the nodes' checks stand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fedaiot.secure_rounds.wire import CONFIRM, SHARE_KEYS, UNMASK
from tests.coordinator_doubles import DOUBLE_ENV

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Attack:
    """A double, the institutions whose console must show one refusal of its run, what that
    line says, what the double must have received (stage -> institutions that answered), and
    how the run ends."""

    kind: str
    refused_by: tuple[str, ...]
    says: str
    received: dict[str, list[str]]
    status: str


ATTACKS = [
    # alpha is shown the coordinator's own keys as gamma's: it refuses before sealing a share.
    Attack(
        "swap-key",
        ("alpha",),
        "(gamma) are not signed by gamma's identity key in the pinned roster",
        {SHARE_KEYS: ["beta", "gamma"], UNMASK: ["beta", "gamma"]},
        "completed",  # beta and gamma are enough: the round goes on without alpha
    ),
    # The first node (by protocol id, drawn per round) is shown the last dropped, the others
    # that it survived: every node sees a confirmation over other sets, nobody unmasks anything.
    Attack(
        "split-survivors",
        ("alpha", "beta", "gamma"),
        "did not sign the survivor set this node was shown",
        {CONFIRM: ["alpha", "beta", "gamma"], UNMASK: []},
        "no-aggregate",
    ),
]


def double_env(kind: str, report: Path) -> dict[str, str]:
    """What ``coordinator start`` needs to run the double ``kind`` in its ServerApp."""
    path = [str(HERE / "coordinator_double"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in path if p), DOUBLE_ENV: f"{kind}:{report}"}


# A bundle the institutions never approved: its ClientApp copies the node's data file out.
MALICIOUS = {
    "pyproject.toml": """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "helpful"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "fedaiot"

[tool.flwr.app.components]
serverapp = "helpful.server:app"
clientapp = "helpful.client:app"

[tool.flwr.app.config]
loot = ""
""",
    "helpful/__init__.py": "",
    "helpful/client.py": """
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def copy(msg: Message, context: Context) -> Message:
    loot = Path(str(context.run_config["loot"]))
    data = Path(str(context.node_config["data-path"])).read_text()
    (loot / f"{context.node_id}.csv").write_text(data)
    return Message(RecordDict({"c": ConfigRecord({"copied": 1})}), reply_to=msg)
""",
    "helpful/server.py": """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
        time.sleep(1)
    ids = list(grid.get_node_ids())
    asks = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=i,
                    message_type="query") for i in ids]
    replies = list(grid.send_and_receive(asks, timeout=600))
    done = Path(str(context.run_config["loot"])) / "server.json"
    done.write_text(json.dumps([r.error.reason if r.has_error() else "ran" for r in replies]))
""",
}


def submit_unsigned(tmp_path: Path, state: Path, loot: Path) -> int:
    """What a coordinator that skips the institutions' approval does: ``flwr run`` a folder."""
    app = tmp_path / "helpful-app"
    for name, text in MALICIOUS.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text.lstrip())
    flwr = str(Path(sys.executable).parent / "flwr")
    env = {**os.environ, "FLWR_HOME": str(state / "flower"), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    submitted = subprocess.run(
        [flwr, "run", str(app), "fedaiot", "--run-config", f'loot="{loot}"', "--format", "json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    answer = json.loads(submitted.stdout[submitted.stdout.find("{") :])
    assert answer["success"], submitted.stdout + submitted.stderr
    return int(answer["run-id"])
