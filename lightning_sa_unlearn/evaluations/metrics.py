"""Held-out and forget-set metrics as a torchmetrics ``Metric`` (so they sync across processes)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode


class ClassificationMetrics(Metric):
    """Accuracy, per-class accuracy and mean loss from a confusion matrix.

    ``compute()`` returns ``accuracy``, ``loss``, ``accuracy_class_<k>`` for every class k (NaN
    for a class with no samples) and, when ``target_class`` is given, ``accuracy_other_classes``:
    accuracy on the samples whose label is not the target class (the fidelity column of the
    paper's Table 2), and ``predicted_as_target``: the share of those samples predicted as the
    target class. On triggered images that share is the backdoor's attack success rate.
    States are sums, so several processes reduce them by adding.
    """

    full_state_update = False

    def __init__(
        self, num_classes: int, target_class: int | None = None, loss_fn: LossFn = F.cross_entropy, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.target_class, self.loss_fn = num_classes, target_class, loss_fn
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        valid = target >= 0  # negative labels are padding the loss ignores (its ignore_index)
        index = (target * self.num_classes + logits.argmax(dim=1))[valid]  # row: true class, column: predicted
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)
        counted = int(valid.sum())
        if counted:
            self.loss_sum += self.loss_fn(logits, target).detach().double() * counted
            self.count += counted

    def compute(self) -> dict[str, float]:
        matrix = self.confusion.double()
        correct, support = matrix.diagonal(), matrix.sum(dim=1)
        metrics = {
            "accuracy": float(correct.sum() / support.sum().clamp(min=1)),
            "loss": float(self.loss_sum / self.count.clamp(min=1)),
        }
        for k in range(self.num_classes):
            metrics[f"accuracy_class_{k}"] = float(correct[k] / support[k]) if support[k] > 0 else float("nan")
        if self.target_class is not None:
            others = torch.ones(self.num_classes, dtype=torch.bool, device=matrix.device)
            others[self.target_class] = False
            metrics["accuracy_other_classes"] = float(correct[others].sum() / support[others].sum().clamp(min=1))
            metrics["predicted_as_target"] = float(
                matrix[others, self.target_class].sum() / support[others].sum().clamp(min=1)
            )
        return metrics

    @torch.no_grad()
    def update_from(self, model: nn.Module, batches: Iterable[Any], progress=lambda it: it) -> ClassificationMetrics:
        """Update with ``model``'s predictions on every batch, in eval mode; returns self."""
        self.to(next(model.parameters()).device)
        with eval_mode(model):
            for x, y in progress(batches_for(model, batches)):
                self.update(model(x), y)
        return self


def classification_metrics(
    model: nn.Module,
    batches: Iterable[Any],
    num_classes: int,
    *,
    target_class: int | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, float]:
    """:class:`ClassificationMetrics` of ``model`` on ``batches`` in one call."""
    return ClassificationMetrics(num_classes, target_class, loss_fn).update_from(model, batches).compute()


def attack_success_rate(model: nn.Module, triggered: Iterable[Any], target_class: int, num_classes: int) -> float:
    """Share of triggered samples whose true class is not ``target_class`` that ``model`` predicts as it.

    ``triggered`` serves ``(x with trigger, true label)``; samples of the target class are ignored.
    """
    metrics = ClassificationMetrics(num_classes, target_class, sync_on_compute=False)
    return metrics.update_from(model, triggered).compute()["predicted_as_target"]
