"""What a campaign is: a training run that continues from a registered model and hands the
service one candidate version.

A study keeps running after its first model: records arrive, and the coordinator trains again
from the model it serves. A campaign takes that model (the registry's ``served`` version, or
one named) with the configuration it was trained under, so that the candidate encodes inputs
exactly as the served model does (the same task, seed and held-out set; a study's same
statistics) and the promotion gate compares like with like. Only what a campaign changes (its
rounds, say) is given; the base's task or study cannot be changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedaiot.config.run import ConfigError, RunConfig, node_counts
from fedaiot.registry.store import Manifest, ModelRegistry

SERVED, FRESH = "served", "fresh"
# Keys of the base's configuration that a campaign sets anew, never inherits.
NOT_INHERITED = {
    "fingerprint",
    "output_dir",
    "node_roster",
    "stop_after_round",
    "init_registry",
    "init_version",
    "ledger_root",
    "min_available_nodes",
    "min_train_nodes",
}
LOCKED = ("task", "study")  # what the candidate must share with its base


class Deployment(BaseModel):
    """Where a deployed campaign trains: the coordinator's kit (``fedaiot coordinator start``'s
    folders and bundle), whose SuperLink the institutions' nodes connect to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pki: Path
    state: Path
    bundle: Path
    approvals: list[Path]  # approval files, or folders of them
    host: str = "127.0.0.1"
    port: int = Field(9093, ge=1, le=65535)


class CampaignSpec(BaseModel):
    """One campaign, as the coordinator asks for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: Path  # the service's registry: the base is read from it, the candidate goes in
    base: str = SERVED  # "served", "fresh" (a first campaign), or a version's name
    name: str = ""  # the campaign's run name (its versions are <name>-r<round>); default below
    workdir: Path | None = None  # campaign runs and shared ledgers: default <registry>/../campaigns
    nodes: int | None = Field(default=None, ge=1)
    engine: Literal["flower", "inprocess", "deployed"] = "flower"
    deployment: Deployment | None = None  # the deployed engine's coordinator kit
    values: dict[str, Any] = Field(default_factory=dict)  # run-config keys (kebab-case)

    @model_validator(mode="after")
    def _deployment_for_the_deployed_engine(self) -> CampaignSpec:
        if (self.engine == "deployed") != (self.deployment is not None):
            raise ValueError(
                "the deployed engine needs the coordinator's kit (--pki, --state, --bundle, "
                "--approval), and only it does"
            )
        if self.deployment is not None and (self.nodes is not None or "node-data" in self.values):
            raise ValueError(
                "a deployed campaign trains on the institutions registered in the coordinator's "
                "kit, each on its own data: --nodes and node-data are for simulated campaigns"
            )
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if value and (not value.replace("-", "").replace("_", "").isalnum() or "-r0" in value):
            raise ValueError(f"campaign name {value!r}: letters, digits, - and _ only (no '-r0')")
        return value

    @property
    def folder(self) -> Path:
        return (self.workdir or self.registry.resolve().parent / "campaigns").resolve()


def resolve_base(spec: CampaignSpec, key: Ed25519PublicKey) -> Manifest | None:
    """The verified manifest of the version the campaign continues from (None: fresh)."""
    if spec.base == FRESH:
        return None
    registry = ModelRegistry(spec.registry)
    version = spec.base
    if spec.base == SERVED:
        version = registry.refs().get(SERVED, "")
        if not version:
            raise ConfigError(
                f"the registry {spec.registry} serves no version yet: name one with --base "
                "VERSION, or start from a fresh model with --base fresh"
            )
    return registry.verify(version, key)  # a base not signed by the coordinator is refused


def inherited(base: Manifest | None) -> dict[str, Any]:
    """The base's run configuration as run-config keys, less what a campaign sets anew."""
    if base is None:
        return {}
    return {
        key.replace("_", "-"): value
        for key, value in base.config.items()
        if key not in NOT_INHERITED and not (isinstance(value, float) and math.isnan(value))
    }


def campaign_name(spec: CampaignSpec, values: dict[str, Any]) -> str:
    """``<task or study>-c<k>``: the next free number in the campaigns folder."""
    if spec.name:
        return spec.name
    stem = Path(str(values["study"])).stem if values.get("study") else str(values["task"])
    taken = {p.name for p in spec.folder.glob(f"{stem}-c*")} if spec.folder.exists() else set()
    number = 1
    while f"{stem}-c{number}" in taken:
        number += 1
    return f"{stem}-c{number}"


def federation(spec: CampaignSpec, values: dict[str, Any], base: Manifest | None) -> int:
    """The campaign's node count: as given, else one per node file, else the base's; deployed,
    the institutions registered in the coordinator's kit."""
    if spec.deployment is not None:
        from fedaiot.deploy.provision import registered_keys

        return len(registered_keys(spec.deployment.pki))
    if spec.nodes is not None:
        return spec.nodes
    if values.get("node-data"):
        folder = Path(str(values["node-data"])).expanduser()
        found = len([p for p in folder.glob("node-*") if p.is_dir()]) if folder.is_dir() else 0
        if found:
            return found
    if base is not None and base.config.get("min_available_nodes"):
        return int(base.config["min_available_nodes"])
    from fedaiot.simulation.engine import federation_size

    return federation_size(values)


def campaign_config(spec: CampaignSpec, base: Manifest | None) -> tuple[RunConfig, int, str]:
    """The run configuration, node count and name of the campaign."""
    given = dict(spec.values)
    values = {"task": RunConfig().task, **inherited(base), **given}
    if base is not None:
        for key in LOCKED:
            was, now = base.config.get(key.replace("-", "_"), ""), values.get(key, "")
            if str(now) != str(was):
                raise ConfigError(
                    f"{key} {now!r}: a campaign continues {base.version}, trained on {key} "
                    f"{was!r}; a different {key} needs a fresh campaign (--base fresh)"
                )
        values["init-registry"] = str(spec.registry.resolve())
        values["init-version"] = base.version
    if base is None:  # what the DP mode needs where nothing said (as fedaiot simulate)
        from fedaiot.config.run import MODE_DEFAULTS

        for key, default in MODE_DEFAULTS.get(str(values.get("dp-mode", "local")), {}).items():
            values.setdefault(key, default)
    for key in ("node-data", "study-data", "study"):
        if values.get(key):  # the nodes' files are found wherever the campaign is started
            values[key] = str(Path(str(values[key])).expanduser().resolve())
    name = campaign_name(spec, values)
    values["output-dir"] = str(spec.folder / name)
    if spec.deployment is not None:  # each institution's ledger is its own node's
        from fedaiot.deploy.coordinator_kit import SPARE_ROUNDS

        values.setdefault("spare-rounds", SPARE_ROUNDS)
        values.pop("node-data", None)  # a simulated base's files: never the institutions'
    elif not values.get("node-data"):  # node files keep their ledgers next to them
        values["ledger-root"] = str(spec.folder / "ledgers")
    nodes = federation(spec, values, base)
    fraction = float(values.get("fraction-train", 1.0))
    cfg = RunConfig.from_run_config({**node_counts(nodes, fraction), **values})
    return cfg, nodes, name
