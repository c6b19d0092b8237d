"""The institution's SuperNode: check the data, write the node config, run ``flower-supernode``.

The data is read and checked against the task's schema *before* the SuperNode starts, so a file
the model cannot take is refused at once, naming the column or shape at fault. The node's
state (its privacy ledger, its node config, Flower's app cache) lives in ``.fedaiot`` next to
the data unless told otherwise. The SuperNode runs only app bundles signed by a key of the
kit's ``trusted-entities.yaml``, and its ClientApp signs and checks secure-aggregation keys
with the kit's identity key and pinned roster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedaiot.config.polling import Polling
from fedaiot.deploy import institution_keys as keys
from fedaiot.deploy import provision
from fedaiot.deploy.superlink import KitError
from fedaiot.launch.processes import flower_env, port_free
from fedaiot.launch.supernode import NodeProcesses, SuperNode
from fedaiot.launch.supernode import start_supernode as launch_supernode
from fedaiot.node.deployed import NodeSettings, check_reply_every, default_ledger_dir
from fedaiot.node.local_data import load_local
from fedaiot.secagg import NodeIdentity
from fedaiot.secure_rounds.identity import IDENTITY_KEY, ROSTER, identity_from
from fedaiot.tasks import get_task

# flower-supernode's exit code when the SuperLink will not activate it (unknown key).
EXIT_NOT_REGISTERED = 305


@dataclass(frozen=True)
class TrustingSuperNode(SuperNode):
    """A SuperNode that runs only app bundles signed by a key its trust file lists: Flower
    refuses any other bundle before a line of it runs (``--trusted-entities``)."""

    trusted_entities: Path = Path(keys.TRUSTED)

    def flower_arguments(self) -> list[str]:  # the stock and the kit's fast SuperNode alike
        trusted = str(self.trusted_entities.resolve())
        return [*super().flower_arguments(), "--trusted-entities", trusted]


@dataclass(frozen=True)
class NodeKit:
    """The institution's own folder: its keys (``fedaiot node init``), the federation's CA and
    roster (``fedaiot node pin``), and the keys its SuperNode trusts to sign app bundles."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / provision.CA_CERT

    @property
    def key(self) -> Path:
        return self.folder / provision.NODE_KEY

    @property
    def identity_key(self) -> Path:
        return self.folder / keys.IDENTITY_KEY

    @property
    def roster(self) -> Path:
        return self.folder / keys.ROSTER

    @property
    def trusted(self) -> Path:
        return self.folder / keys.TRUSTED

    def check(self) -> NodeIdentity:
        """The kit's identity once every file is there, secrets 0600 and its key pinned."""
        for path, made_by in (
            (self.key, "fedaiot node init"),
            (self.identity_key, "fedaiot node init"),
            (self.trusted, "fedaiot node init"),
            (self.ca, "fedaiot node pin"),
            (self.roster, "fedaiot node pin"),
        ):
            if not path.is_file():
                raise KitError(f"{path} not found: make it with `{made_by}`")
        for name in keys.SECRETS:
            path = self.folder / name
            if path.exists() and path.stat().st_mode & 0o077:
                raise KitError(f"{path} is readable by others: chmod 600 {path}")
        keys.read_trusted(self.folder)
        return identity_from(self.identity_key, self.roster)


@dataclass(frozen=True)
class PreparedNode:
    settings: NodeSettings
    node_config: Path
    examples: int


def prepare(
    *,
    task: str,
    data: Path,
    name: str,
    ledger_dir: Path | None = None,
    max_epsilon: float | None = None,
    study: Path | None = None,
    kit: NodeKit | None = None,
    reply_every: float | None = None,
) -> PreparedNode:
    """Check the data against the task's schema (or the study) and write the SuperNode's node
    config; a file that does not fit is refused here, before the node ever connects."""
    data = Path(data).expanduser().resolve()
    if study is not None:
        from fedaiot.studies.spec import load_study
        from fedaiot.studies.table import read_table

        study = Path(study).expanduser().resolve()
        spec = load_study(study)
        examples = len(read_table(spec, data))  # StudyError names the column, row or rule
        task = f"study:{spec.id}"
    else:
        examples = len(load_local(get_task(task), data))  # LocalDataError names the fault
    settings = NodeSettings(
        data_path=data,
        node_name=provision.check_name(name),
        task=task,
        ledger_dir=(Path(ledger_dir).expanduser().resolve() if ledger_dir else None)
        or default_ledger_dir(data),
        max_epsilon=max_epsilon,
        study=study,
        reply_every=check_reply_every(reply_every) if reply_every is not None else None,
    )
    settings.ledger_dir.mkdir(parents=True, exist_ok=True)
    config = settings.ledger_dir / f"node-config-{settings.node_name}.toml"
    node_config: dict[str, str | float] = settings.to_node_config()
    if kit is not None:  # read by the ClientApp, for secure aggregation's signatures
        node_config[IDENTITY_KEY] = str(kit.identity_key.resolve())
        node_config[ROSTER] = str(kit.roster.resolve())
    config.write_text(tomli_w.dumps(node_config))
    return PreparedNode(settings, config, examples)


def start_supernode(
    kit: NodeKit,
    prepared: PreparedNode,
    superlink: str,
    port: int,
    log_path: Path,
    polling: Polling | None = None,
) -> NodeProcesses:
    """The node's processes: the kit's SuperNode and ClientApp runner (Flower's own with
    stock polling, or a Flower the kit was not verified against: ``notes`` says so)."""
    kit.check()
    if not port_free("127.0.0.1", port):
        raise KitError(f"port {port} (the node's local app port) is in use: choose --port")
    home = prepared.settings.ledger_dir / "flower"
    home.mkdir(parents=True, exist_ok=True)
    node = TrustingSuperNode(superlink, kit.ca, kit.key, prepared.node_config, port, kit.trusted)
    with open(log_path, "ab") as log:
        return launch_supernode(node, flower_env(home), log, polling or Polling())


def explain_exit(code: int, log_path: Path, offset: int = 0) -> str:
    """Why the SuperNode stopped, from what it logged since ``offset`` (its exit code is 1
    for most failures, so the log tells a refused key from a TLS problem)."""
    try:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            logged = handle.read().decode(errors="replace")
    except OSError:
        logged = ""
    if "Failed to activate SuperNode" in logged:
        return (
            "the SuperLink refused this node: its public key is not registered (the "
            f"coordinator registers node.pub with `fedaiot coordinator start`); see {log_path}"
        )
    if "SSL/TLS handshake error" in logged or "CERTIFICATE_VERIFY_FAILED" in logged:
        return (
            "TLS handshake with the SuperLink failed: check that ca.crt is the federation's CA "
            f"and that the SuperLink's address is in its certificate; see {log_path}"
        )
    return f"flower-supernode exited with code {code}: see {log_path}"
