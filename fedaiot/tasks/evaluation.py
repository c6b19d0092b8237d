"""How a model does on a data set: loss and accuracy; for two classes AUC, sensitivity and
specificity. Used by the coordinator (its held-out set), the baselines and the attacks."""

from __future__ import annotations

import math

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
