"""An evaluation on its own, outside the callback: one process, no trainer of the user's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_sa_unlearn.adapters import BatchAdapter
from lightning_sa_unlearn.context import UnlearningRun
from lightning_sa_unlearn.functional import LossFn, eval_mode


def evaluate(
    evaluation: Any, model: nn.Module, datamodule: Any, loss_fn: LossFn, seed: int, adapter: BatchAdapter | None
) -> dict[str, Any]:
    """``evaluation.measure`` on ``model`` and the loaders of ``datamodule`` (then ``model``) in this process alone:
    what ``evaluation(model, datamodule, ...)`` (:meth:`~lightning_sa_unlearn.Evaluation.__call__`) runs."""
    run = UnlearningRun.standalone(model, datamodule, loss_fn=loss_fn, seed=seed, adapter=adapter)
    evaluation.check(run)
    with torch.inference_mode(False), torch.enable_grad(), run.seeded(), eval_mode(model):
        run.build_batches()
        return evaluation.measure(run)
