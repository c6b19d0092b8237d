"""Membership inference: an empirical check of what a global model leaks about its records.

A membership-inference attacker holds a trained model and a candidate record and guesses
whether the record was in the training data. We measure two attacks on balanced samples of
*members* (records some node trained on) and *non-members* (held-out records no node ever
saw):

* **Loss threshold** (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018): score a
  record by minus the model's loss on it; members tend to have lower loss.
* **Class-calibrated confidence** (the offline, global-variance form of LiRA, Carlini et al.,
  "Membership Inference Attacks From First Principles", S&P 2022, without shadow models):
  score a record by its logit-scaled true-class confidence
  ``phi = log(p_y / (1 - p_y))``, standardized by the mean and standard deviation that
  *non-members of the same class* have. Some classes are simply harder than others; a single
  loss threshold mistakes a hard class's members for non-members, the per-class calibration
  does not. The reference statistics are cross-fitted (each record is standardized with
  statistics of non-members from the other half of the sample), so the attack never sees the
  membership of the record it scores.

How to read the numbers:

* **AUC 0.5** means the attacker does no better than a coin flip; 1.0 means it tells members
  from non-members perfectly. The AUC is an *empirical lower bound* on leakage: a stronger
  attack could do better, so a low AUC is evidence, never a proof, of privacy.
* **TPR at 1 % FPR** is how many members the attacker finds while wrongly accusing only 1 % of
  non-members: what matters when an attacker must be confident (Carlini et al.). With a few
  hundred non-members it rests on a handful of records and is noisy.
* **Balanced accuracy** is that of the best threshold, chosen on the same sample: optimistic.

What differential privacy guarantees: if training is ``(epsilon, delta)``-DP with respect to
one record, every membership test on that record satisfies
``TPR <= e^epsilon * FPR + delta`` (and symmetrically ``1 - FPR <= e^epsilon (1 - TPR) +
delta``), so its AUC and its TPR at low FPR are bounded whatever the attacker does. In fedaiot
the guarantee is per node and per record of that node (record-level DP-SGD); the bound is loose
for epsilon of a few units, and real attacks typically sit far below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fedaiot.config.run import RunConfig
from fedaiot.errors import BadInputError
from fedaiot.node.round import simulated_federation
from fedaiot.registry.store import ModelRegistry
from fedaiot.tasks import ArrayData, get_task

LOW_FPR = 0.01
# Fewer reference non-members than this in a class: its statistics are too noisy to trust,
# so the class falls back to statistics over all classes.
MIN_CLASS_REFERENCE = 5
_BATCH = 1024


class MembershipError(BadInputError):
    """The attack cannot run on these inputs (empty data, an unusable run folder)."""


@dataclass(frozen=True)
class AttackScore:
    """How well one attack separates members from non-members."""

    auc: float  # ROC AUC; 0.5 = chance
    balanced_accuracy: float  # of the best threshold on this sample (optimistic)
    tpr_at_1pct_fpr: float  # fraction of members found while flagging <= 1 % of non-members


@dataclass(frozen=True)
class MembershipResult:
    """Both attacks on one model, and the sample they were measured on."""

    loss: AttackScore  # Yeom et al.'s loss threshold
    calibrated: AttackScore  # per-class standardized logit confidence (offline LiRA-style)
    n_members: int
    n_non_members: int
    member_accuracy: float  # the model's accuracy on the sampled members ...
    non_member_accuracy: float  # ... and on the sampled non-members: the generalization gap

    @property
    def loss_auc(self) -> float:
        return self.loss.auc

    @property
    def calibrated_auc(self) -> float:
        return self.calibrated.auc

    @property
    def tpr_at_1pct_fpr(self) -> float:
        """The better of the two attacks at 1 % FPR."""
        return max(self.loss.tpr_at_1pct_fpr, self.calibrated.tpr_at_1pct_fpr)


def attack(
    model: nn.Module,
    members: ArrayData,
    non_members: ArrayData,
    *,
    seed: int = 0,
    max_examples: int = 2000,
) -> MembershipResult:
    """Run the loss-threshold and class-calibrated attacks against ``model``.

    Args:
        model: the trained classifier (logits out); put in eval mode for scoring and restored.
        members: records the model was trained on.
        non_members: records from the same distribution it never saw.
        seed: picks the balanced samples and the cross-fitting halves.
        max_examples: at most this many records of each kind are attacked.

    Both sides are sampled without replacement to the same size,
    ``min(len(members), len(non_members), max_examples)``, so 0.5 is chance for every metric.

    Raises:
        MembershipError: when either side is empty or ``max_examples`` < 1.
    """
    if len(members) == 0 or len(non_members) == 0:
        raise MembershipError(
            f"membership attack needs members and non-members, got {len(members)} members "
            f"and {len(non_members)} non-members"
        )
    if max_examples < 1:
        raise MembershipError(f"max_examples must be >= 1, got {max_examples}")
    rng = np.random.default_rng(seed)
    size = min(len(members), len(non_members), max_examples)
    inside = _subsample(members, size, rng)
    outside = _subsample(non_members, size, rng)
    labels = np.concatenate([inside.y, outside.y])
    is_member = np.concatenate([np.ones(size, dtype=bool), np.zeros(size, dtype=bool)])
    logits = np.concatenate([_logits(model, inside), _logits(model, outside)])
    loss = _cross_entropy(logits, labels)
    confidence = _logit_confidence(logits, labels)
    calibrated = _calibrate(confidence, labels, is_member, rng)
    correct = logits.argmax(axis=1) == labels
    return MembershipResult(
        loss=_score(is_member, -loss),
        calibrated=_score(is_member, calibrated),
        n_members=size,
        n_non_members=size,
        member_accuracy=float(correct[is_member].mean()),
        non_member_accuracy=float(correct[~is_member].mean()),
    )


def attack_run(run_dir: Path, *, version: str = "latest", seed: int = 0) -> MembershipResult:
    """Attack a run's global model with the records its nodes trained on.

    ``version`` is a registry ref (``latest``, ``best``) or a version name. The weights are
    loaded through :meth:`ModelRegistry.load`, which checks their SHA-256 against the manifest
    (safetensors: nothing is unpickled). The manifest's RunConfig rebuilds the run's simulated
    federation; members are the partitions of the nodes whose updates entered this version,
    non-members the server's held-out test set.

    Raises:
        RegistryError: the version is missing, corrupt or tampered with.
        MembershipError: the manifest does not say how the data was split.
    """
    registry = ModelRegistry(Path(run_dir) / "registry")
    name = registry.refs().get(version, version)
    weights, manifest = registry.load(name)
    recorded = {k: v for k, v in manifest.config.items() if k != "fingerprint"}
    try:
        cfg = RunConfig.model_validate(recorded)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise MembershipError(f"model version {name}: unusable run config: {first}") from None
    nodes = _partition_ids([n.id for n in manifest.nodes], name)
    federation = simulated_federation(cfg, len(nodes))
    trained = [federation.partitions[nodes[n.id]] for n in manifest.nodes if n.rounds > 0]
    if not trained:
        raise MembershipError(f"model version {name}: no node's update entered the model")
    model = get_task(cfg.task).build_model()
    model.load_state_dict(weights)
    members = ArrayData(
        x=np.concatenate([p.x for p in trained]), y=np.concatenate([p.y for p in trained])
    )
    return attack(model, members, federation.test, seed=seed)


def _partition_ids(ids: list[str], version: str) -> dict[str, int]:
    """Node id -> partition index; simulated node ``node-i`` holds partition ``i``."""
    try:
        index = {node: int(node.removeprefix("node-")) for node in ids}
    except ValueError:
        index = {}
    if not index or sorted(index.values()) != list(range(len(index))):
        raise MembershipError(
            f"model version {version}: nodes {sorted(ids)} are not node-0 .. node-<n-1>, so the "
            "federation's split cannot be rebuilt (a node that never replied, or a real "
            "deployment whose data is not simulated)"
        )
    return index


def _subsample(data: ArrayData, size: int, rng: np.random.Generator) -> ArrayData:
    pick = np.sort(rng.choice(len(data), size=size, replace=False))
    return ArrayData(x=data.x[pick], y=data.y[pick])


@torch.no_grad()
def _logits(model: nn.Module, data: ArrayData) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(data.x)
        out = [model(x[i : i + _BATCH]) for i in range(0, len(x), _BATCH)]
        return torch.cat(out).double().numpy()
    finally:
        model.train(was_training)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_norm - logits[np.arange(len(labels)), labels]


def _logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` computed as ``z_y - logsumexp(z_j, j != y)``.

    Written this way it stays finite where ``p_y`` rounds to 1, which is exactly where
    overfit members are.
    """
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    return true - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def _calibrate(
    confidence: np.ndarray, labels: np.ndarray, is_member: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Standardize each record by non-members of its class in the *other* half (cross-fitting)."""
    half = rng.permutation(len(confidence)) % 2 == 0
    scores = np.empty_like(confidence)
    for fold in (half, ~half):
        reference = ~fold & ~is_member
        overall = _mean_std(confidence[reference])
        for label in np.unique(labels[fold]):
            mine = fold & (labels == label)
            same_class = reference & (labels == label)
            if same_class.sum() >= MIN_CLASS_REFERENCE:
                mean, std = _mean_std(confidence[same_class])
            else:
                mean, std = overall
            scores[mine] = (confidence[mine] - mean) / std
    return scores


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return 0.0, 1.0
    # A floor keeps a class whose non-members all sit at one confidence from dividing by 0.
    return float(values.mean()), max(float(values.std()), 1e-6)


def _score(is_member: np.ndarray, score: np.ndarray) -> AttackScore:
    fpr, tpr, _ = roc_curve(is_member, score)
    low = tpr[fpr <= LOW_FPR]
    return AttackScore(
        auc=float(roc_auc_score(is_member, score)),
        balanced_accuracy=float(0.5 * (1.0 + np.max(tpr - fpr))),
        tpr_at_1pct_fpr=float(low.max()) if len(low) else math.nan,
    )
