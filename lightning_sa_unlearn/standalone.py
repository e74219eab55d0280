"""An evaluation on its own, outside the callback: one process, no trainer of the user's."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sa_unlearn.adapters import BatchAdapter
from lightning_sa_unlearn.context import UnlearningRun
from lightning_sa_unlearn.functional import LossFn, eval_mode


def evaluate(
    evaluation: Any,
    model: nn.Module,
    datamodule: Any = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
    batch_adapter: BatchAdapter | None = None,
) -> dict[str, Any]:
    """``evaluation.measure`` (an :class:`~lightning_sa_unlearn.Evaluation` part) on ``model`` and the loaders
    of ``datamodule`` (then ``model``), in this process.

    ``batch_adapter``: how batches and logits are read, as on the callback (default: ``(x, y)`` tuples).
    ``evaluation(model, datamodule)`` calls this.
    """
    run = UnlearningRun.standalone(model, datamodule, loss_fn=loss_fn, seed=seed, adapter=batch_adapter)
    evaluation.check(run)
    with torch.inference_mode(False), torch.enable_grad(), run.seeded(), eval_mode(model):
        run.build_batches()
        return evaluation.measure(run)
