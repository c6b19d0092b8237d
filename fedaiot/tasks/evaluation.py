"""How a model does on a data set: loss and accuracy; for two classes AUC, sensitivity and
specificity. Used by the coordinator (its held-out set), the baselines and the attacks."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedaiot.tasks.base import ArrayData


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ArrayData, *, positive_class: int = 1, batch_size: int = 512
) -> dict[str, float]:
    """Loss and accuracy; for two classes also AUC, sensitivity and specificity."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    loss = float(criterion(logits, y)) / len(y)
    predicted = logits.argmax(dim=1)
    metrics = {"loss": loss, "accuracy": float((predicted == y).float().mean())}
    if logits.shape[1] == 2:
        truth = (y == positive_class).numpy()
        score = torch.softmax(logits, dim=1)[:, positive_class].numpy()
        said = (predicted == positive_class).numpy()
        positives, negatives = truth.sum(), (~truth).sum()
        metrics["sensitivity"] = float((said & truth).sum() / positives) if positives else math.nan
        metrics["specificity"] = (
            float((~said & ~truth).sum() / negatives) if negatives else math.nan
        )
        both = positives and negatives
        metrics["auc"] = float(roc_auc_score(truth, score)) if both else math.nan
    return metrics


# --- federated evaluation: counts each node sums, metrics from their total -------------------

BINS = 10  # score bins of a binary task; even, so that 0.5 (the decision threshold) is an edge


def counts_length(num_classes: int) -> int:
    return 2 * BINS if num_classes == 2 else num_classes * num_classes


@torch.no_grad()
def evaluation_counts(model: nn.Module, data: ArrayData, *, positive_class: int) -> np.ndarray:
    """Counts a node can add up with the others: for two classes, a histogram of the positive
    class's score for each true class (negatives first); else the confusion matrix. Every
    record adds 1 to exactly one count, so one record changes the vector by L2 norm 1."""
    model.eval()
    logits = model(torch.from_numpy(data.x))
    classes = logits.shape[1]
    counts = np.zeros(counts_length(classes))
    truth = data.y
    if classes == 2:
        score = torch.softmax(logits, dim=1)[:, positive_class].numpy()
        bins = np.minimum((score * BINS).astype(np.int64), BINS - 1)
        offset = np.where(truth == positive_class, BINS, 0)
        np.add.at(counts, offset + bins, 1.0)
    else:
        predicted = logits.argmax(dim=1).numpy()
        np.add.at(counts, truth * classes + predicted, 1.0)
    return counts


def metrics_from_counts(counts: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy (and for two classes sensitivity, specificity and AUC from the binned scores)
    of summed, possibly noisy, counts; noise that drives a count below 0 counts as 0."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.0)
    total = float(counts.sum())
    if total <= 0:
        return {"examples": 0.0}
    if num_classes != 2:
        matrix = counts.reshape(num_classes, num_classes)
        return {"accuracy": float(np.trace(matrix)) / total, "examples": total}
    negatives, positives = counts[:BINS], counts[BINS:]
    half = BINS // 2
    tp, fn = positives[half:].sum(), positives[:half].sum()
    tn, fp = negatives[:half].sum(), negatives[half:].sum()
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
    pairs = positives.sum() * negatives.sum()
    auc = float((positives * (below + 0.5 * negatives)).sum() / pairs) if pairs else math.nan
    return {
        "accuracy": float(tp + tn) / total,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
        "auc": auc,
        "examples": total,
    }
