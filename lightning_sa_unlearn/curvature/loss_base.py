"""The interface of a loss's curvature rule in the model's outputs (:mod:`~lightning_sa_unlearn.curvature.losses`):
:class:`OutputLoss` for a loss, :class:`BatchLoss` for its rows on one batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


class OutputLoss:
    """How one loss curves in the model's outputs; :meth:`batch` gives the rows for one batch."""

    name = "generic"
    samples_labels = True
    """False where ``mc_ggn`` has no distribution to sample from (the generic rule)."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def plain_cross_entropy(self, targets: Tensor) -> bool:
        """True where the original per-example path serves: unweighted cross-entropy on ``[N, C]`` with labels."""
        return False

    def batch(self, logits: Tensor, targets: Tensor) -> BatchLoss:
        raise NotImplementedError


class BatchLoss:
    """The rows of one batch: ``factor`` (exact), ``sampled`` (Monte-Carlo), ``gradient`` (empirical Fisher).

    Each returns ``[n, rows, *output shape]`` for the examples in ``part``.
    """

    def __init__(self, loss: OutputLoss, logits: Tensor, targets: Tensor) -> None:
        self.loss, self.logits, self.targets = loss, logits.detach(), targets
        self._gradient: Tensor | None = None

    @property
    def outputs(self) -> int:
        """Output entries per example."""
        return self.logits[0].numel()

    def factor(self, part: slice) -> Tensor:
        raise NotImplementedError

    def sampled(self, part: slice, num_samples: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def gradient(self, part: slice) -> Tensor:
        """``N_b ∇_{f_n} L_b``: the gradient of example n's term of the batch loss, one row."""
        if self._gradient is None:
            with torch.enable_grad():
                logits = self.logits.clone().requires_grad_()
                loss = self.loss.loss_fn(logits, self.targets)
                _require_scalar(loss)
                (gradient,) = torch.autograd.grad(loss * logits.shape[0], logits, allow_unused=True)
            self._gradient = torch.zeros_like(logits) if gradient is None else gradient.detach()
        return self._gradient[part].unsqueeze(1)


def _require_scalar(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(
            "loss_fn(logits, targets) must return the batch MEAN as a scalar tensor (reduction='mean'), got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}."
        )


def _describe(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
