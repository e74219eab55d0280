"""Held-out and forget-set metrics, computed with torchmetrics (so they sync across processes)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode


@torch.no_grad()
def classification_metrics(
    model: nn.Module,
    batches: Iterable[Any],
    num_classes: int,
    *,
    target_class: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
    progress=lambda it: it,
) -> dict[str, float]:
    """Accuracy, per-class accuracy and mean loss of ``model`` on ``batches``.

    Keys: ``accuracy``, ``loss``, ``accuracy_class_<k>`` for every class k, and, when
    ``target_class`` is given, ``accuracy_other_classes`` (accuracy on samples whose label is not
    the target class: the fidelity column of the paper's Table 2). A class with no samples has
    accuracy NaN.
    """
    device = next(model.parameters()).device
    confusion = MulticlassConfusionMatrix(num_classes=num_classes).to(device)
    mean_loss = MeanMetric().to(device)
    with eval_mode(model):
        for x, y in progress(batches_for(model, batches)):
            logits = model(x)
            confusion.update(logits.argmax(dim=-1), y)
            mean_loss.update(loss_fn(logits, y).detach().float(), weight=x.shape[0])
    matrix = confusion.compute().double()  # rows: true class, columns: predicted
    correct, support = matrix.diagonal(), matrix.sum(dim=1)
    metrics = {"accuracy": float(correct.sum() / support.sum().clamp(min=1)), "loss": float(mean_loss.compute())}
    for k in range(num_classes):
        metrics[f"accuracy_class_{k}"] = float(correct[k] / support[k]) if support[k] > 0 else float("nan")
    if target_class is not None:
        others = torch.ones(num_classes, dtype=torch.bool, device=matrix.device)
        others[target_class] = False
        metrics["accuracy_other_classes"] = float(correct[others].sum() / support[others].sum().clamp(min=1))
    return metrics
