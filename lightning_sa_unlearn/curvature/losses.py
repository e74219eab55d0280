"""The loss's curvature in the model's outputs, read from the loss actually used.

The per-example estimators (``ggn``, ``mc_ggn``, ``empirical_fisher``) need, for each example ``n`` of a
batch of ``N_b`` examples with outputs ``F`` and targets ``Y``, rows ``s_nk`` of the example's block of
``N_b · ∇²_F L_b``, where ``L_b = loss_fn(F, Y)`` is the batch loss (a mean), so that
``Σ_n Jₙᵀ (Σ_k s_nk s_nkᵀ) Jₙ = N_b · GGN(L_b)``. Summing these over batches and dividing by the number
of examples gives the diagonal that the ``exact`` and ``hutchinson`` methods compute for the same loss:
``(1/N) Σ_b N_b · diag ∇²L_b``. For a loss whose mean is over examples, this is the Hessian of the mean
training loss; for a class-weighted mean (``weight=``, ``ignore_index``) it is the size-weighted mean
of the batch losses' Hessians, which is the Hessian of ``loss_fn`` on one batch holding all the data.

:func:`output_loss` identifies the loss and returns the matching rule:

* cross-entropy (``F.cross_entropy``, ``nn.CrossEntropyLoss``, a ``functools.partial`` of either's
  keywords) with ``weight``, ``ignore_index`` and ``label_smoothing``, on logits ``[N, C]`` or with extra
  positions ``[N, C, d1, ...]`` (per pixel, per token): ``c_nt (diag p − ppᵀ)`` per position;
* ``nll_loss`` on log-probabilities (a model ending in ``log_softmax``): cross-entropy on them, which is
  the Gauss-Newton matrix split before the ``LogSoftmax`` (at the log-probabilities themselves the loss
  is linear and its GGN is zero); outputs that are not log-probabilities are refused;
* ``binary_cross_entropy_with_logits`` (``weight``, ``pos_weight``) and ``mse_loss``: diagonal output
  Hessians;
* anything else: the generic rule, the loss's Hessian in the outputs by autograd (double backward),
  checked to be block-diagonal over examples (a loss that couples examples is refused) and positive
  semi-definite (a loss that is not convex in the outputs has no Gauss-Newton matrix; refused).

Identified losses need ``reduction="mean"``; other reductions take the generic rule.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.curvature.generic_loss import GenericLoss
from lightning_sa_unlearn.curvature.loss_base import (  # noqa: F401 (re-exported)
    BatchLoss,
    LossFn,
    OutputLoss,
    _describe,
    _require_scalar,
)


def output_loss(loss_fn: LossFn) -> OutputLoss:
    """The curvature rule of ``loss_fn``: identified from the function, its ``nn`` module or a ``functools.partial``."""
    func, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial):
        if loss_fn.args:
            return _generic(loss_fn)
        func, keywords = loss_fn.func, dict(loss_fn.keywords)
    if keywords.get("size_average") is not None or keywords.get("reduce") is not None:
        return _generic(loss_fn)
    if type(func) in (nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss, nn.MSELoss):
        attributes = {
            name: getattr(func, name)
            for name in ("weight", "ignore_index", "label_smoothing", "reduction", "pos_weight")
            if hasattr(func, name)
        }
        keywords = {**attributes, **keywords}
        func = {
            nn.CrossEntropyLoss: F.cross_entropy,
            nn.NLLLoss: F.nll_loss,
            nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits,
            nn.MSELoss: F.mse_loss,
        }[type(func)]
    if keywords.pop("reduction", "mean") != "mean":
        return _generic(loss_fn)
    allowed = {
        F.cross_entropy: {"weight", "ignore_index", "label_smoothing"},
        F.nll_loss: {"weight", "ignore_index"},
        F.binary_cross_entropy_with_logits: {"weight", "pos_weight"},
        F.mse_loss: set(),
    }
    if func not in allowed or not set(keywords) <= allowed[func]:
        return _generic(loss_fn)
    if func is F.cross_entropy or func is F.nll_loss:
        return CrossEntropyLoss(
            loss_fn,
            weight=keywords.get("weight"),
            ignore_index=keywords.get("ignore_index", -100),
            label_smoothing=keywords.get("label_smoothing", 0.0),
            log_probabilities=func is F.nll_loss,
        )
    if func is F.binary_cross_entropy_with_logits:
        return BinaryCrossEntropyLoss(loss_fn, weight=keywords.get("weight"), pos_weight=keywords.get("pos_weight"))
    return SquaredErrorLoss(loss_fn)


def ignored_label(loss_fn: LossFn) -> int | None:
    """The label that ``loss_fn`` skips (cross-entropy's and nll_loss's ``ignore_index``), or None."""
    rule = output_loss(loss_fn)
    return rule.ignore_index if isinstance(rule, CrossEntropyLoss) else None


class CrossEntropyLoss(OutputLoss):
    """Cross-entropy over dim 1, or ``nll_loss`` on log-probabilities (treated as cross-entropy on them).

    Position ``t`` of example ``n`` adds ``c_nt · N_b/D · (diag p − ppᵀ)`` with
    ``c = (1 − ε) w_y + (ε/C) Σ_c w_c`` (0 where the target is ``ignore_index``) and
    ``D = Σ_{n,t} w_{y_nt}`` over the targets not ignored (the count of them without weights):
    label smoothing does not change the Hessian in the logits, class weights scale it.
    """

    name = "cross_entropy"

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        log_probabilities: bool,
    ) -> None:
        super().__init__(loss_fn)
        self.weight, self.ignore_index = weight, ignore_index
        self.label_smoothing, self.log_probabilities = float(label_smoothing), log_probabilities
        if log_probabilities:
            self.name = "nll_loss"

    def plain_cross_entropy(self, targets: Tensor) -> bool:
        return (
            not self.log_probabilities
            and self.weight is None
            and self.label_smoothing == 0
            and targets.dim() == 1
            and not targets.is_floating_point()
            and not bool((targets == self.ignore_index).any())
        )

    def batch(self, logits: Tensor, targets: Tensor) -> BatchLoss:
        if targets.is_floating_point() or targets.dim() != logits.dim() - 1:
            if self.log_probabilities:
                raise ValueError(
                    f"nll_loss needs class-index targets of shape {tuple(logits.shape[:1] + logits.shape[2:])} "
                    f"for outputs of shape {tuple(logits.shape)}; got {targets.dtype} targets of shape "
                    f"{tuple(targets.shape)}."
                )
            return _generic(self.loss_fn).batch(logits, targets)  # probability targets
        if self.log_probabilities:
            total = torch.logsumexp(logits.detach().double(), dim=1)
            tolerance = max(1e-4, 100 * torch.finfo(logits.dtype).eps)
            if not bool((total.abs() <= tolerance).all()):
                raise ValueError(
                    "nll_loss expects log-probabilities, but the model's outputs are not: exp(outputs) sums "
                    f"to {float(total.exp().max()):.4g} over the classes for some example, not 1. The loss is "
                    "then linear in the outputs and its Gauss-Newton matrix is zero. End the model with "
                    "log_softmax (nn.LogSoftmax(dim=1)), or train and measure with cross_entropy."
                )
        return _CrossEntropyBatch(self, logits, targets)


class _CrossEntropyBatch(BatchLoss):
    def __init__(self, loss: CrossEntropyLoss, logits: Tensor, targets: Tensor) -> None:
        super().__init__(loss, logits, targets)
        classes = logits.shape[1]
        active = targets != loss.ignore_index
        labels = torch.where(active, targets, torch.zeros_like(targets))
        if loss.weight is None:
            label_weight = active.to(logits.dtype)
            coefficient = label_weight
        else:
            weight = loss.weight.to(device=logits.device, dtype=logits.dtype)
            label_weight = weight[labels] * active
            smoothing = loss.label_smoothing / classes * weight.sum()
            coefficient = ((1 - loss.label_smoothing) * label_weight + smoothing) * active
        denominator = label_weight.sum()
        scale = coefficient * (logits.shape[0] / denominator) if denominator > 0 else torch.zeros_like(coefficient)
        self.scale = scale.reshape(logits.shape[0], -1)  # [N, T]
        # probabilities with the class dim last: [N, T, C]
        self.probabilities = torch.softmax(logits.detach(), dim=1).reshape(logits.shape[0], classes, -1).transpose(1, 2)

    def factor(self, part: slice) -> Tensor:
        p, scale = self.probabilities[part], self.scale[part]  # [n, T, C], [n, T]
        n, positions, classes = p.shape
        rows = softmax_hessian_factor(p.reshape(-1, classes)).reshape(n, positions, -1, classes)
        rows = rows * scale.sqrt()[:, :, None, None]  # [n, T, C−1, C]
        if positions == 1:
            return rows[:, 0]  # [n, C−1, C]
        # row (t, k) lives at position t only: [n, T, C−1, C, T]
        spread = torch.diag_embed(rows.permute(0, 2, 3, 1)).permute(0, 3, 1, 2, 4)
        return spread.reshape(n, -1, classes, *self.logits.shape[2:])

    def sampled(self, part: slice, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """``√(c/m) (p − e_ŷ)`` per position with ``ŷ ~ p``: ``E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag p − ppᵀ``."""
        p, scale = self.probabilities[part], self.scale[part]
        n, positions, classes = p.shape
        device = generator.device if generator is not None else p.device
        flat = p.reshape(-1, classes).double().to(device)
        require_finite_probabilities(flat)
        labels = torch.multinomial(flat, num_samples, replacement=True, generator=generator).to(p.device)
        one_hot = F.one_hot(labels, classes).to(p.dtype).reshape(n, positions, num_samples, classes)
        rows = (p[:, :, None, :] - one_hot) * (scale / num_samples).sqrt()[:, :, None, None]  # [n, T, m, C]
        rows = rows.permute(0, 2, 3, 1)  # [n, m, C, T]
        return rows.reshape(n, num_samples, classes, *self.logits.shape[2:])


def softmax_hessian_factor(p: Tensor) -> Tensor:
    """``[M, C−1, C]`` rows ``S`` with ``SᵀS = diag(p) − ppᵀ`` for each row of probabilities ``p`` ``[M, C]``.

    The C rows ``√p_c (e_c − p)`` reflected by ``Q = I − 2vvᵀ/‖v‖²`` with ``v = e_0 + √p`` (row 0 becomes
    zero), as in :func:`~lightning_sa_unlearn.curvature.functional._output_hessian_factor`; one class: one zero row.
    """
    classes = p.shape[-1]
    eye = torch.eye(classes, dtype=p.dtype, device=p.device)
    rows = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])  # [M, C, C]
    if classes == 1:
        return rows
    v = eye[0][None] + p.sqrt()  # [M, C]
    coefficient = 2 / (v * v).sum(-1)  # [M]
    reflected = rows - coefficient[:, None, None] * v[:, :, None] * (v[:, None, :] @ rows)
    return reflected[:, 1:]


class BinaryCrossEntropyLoss(OutputLoss):
    """``binary_cross_entropy_with_logits``: entry e adds ``w_e σ(1 − σ)(1 + (pos_weight − 1) y_e) / E``."""

    name = "binary_cross_entropy_with_logits"

    def __init__(self, loss_fn: LossFn, *, weight: Tensor | None, pos_weight: Tensor | None) -> None:
        super().__init__(loss_fn)
        self.weight, self.pos_weight = weight, pos_weight

    def batch(self, logits: Tensor, targets: Tensor) -> BatchLoss:
        z = logits.detach()
        sigma = torch.sigmoid(z)
        curvature = sigma * (1 - sigma)
        y = targets.to(z.dtype)
        if self.pos_weight is not None:
            curvature = curvature * (1 + (self.pos_weight.to(z) - 1) * y)
        if self.weight is not None:
            curvature = curvature * self.weight.to(z)
        return _DiagonalBatch(self, logits, targets, curvature.expand_as(z) / z[0].numel())


class SquaredErrorLoss(OutputLoss):
    """``mse_loss``: every entry adds ``2/E`` (E output entries per example)."""

    name = "mse_loss"

    def batch(self, logits: Tensor, targets: Tensor) -> BatchLoss:
        z = logits.detach()
        return _DiagonalBatch(self, logits, targets, torch.full_like(z, 2.0 / z[0].numel()))


class _DiagonalBatch(BatchLoss):
    """A diagonal output Hessian: one row per output entry, ``√h_e e_e``; sampled rows ``z ⊙ √h`` (Rademacher)."""

    def __init__(self, loss: OutputLoss, logits: Tensor, targets: Tensor, curvature: Tensor) -> None:
        super().__init__(loss, logits, targets)
        self.root = curvature.clamp(min=0).sqrt()

    def factor(self, part: slice) -> Tensor:
        root = self.root[part]
        n = root.shape[0]
        return torch.diag_embed(root.reshape(n, -1)).reshape(n, -1, *root.shape[1:])

    def sampled(self, part: slice, num_samples: int, generator: torch.Generator | None) -> Tensor:
        root = self.root[part]
        signs = _rademacher((root.shape[0], num_samples, *root.shape[1:]), root, generator)
        return signs * root[:, None] / math.sqrt(num_samples)


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype=like.dtype, device=like.device)


def _generic(loss_fn: LossFn) -> OutputLoss:
    """The generic rule (:class:`~lightning_sa_unlearn.curvature.generic_loss.GenericLoss`)."""
    return GenericLoss(loss_fn)


def require_finite_probabilities(probabilities: Tensor) -> None:
    """Labels cannot be sampled from NaN probabilities: say so as a non-finite curvature."""
    if not torch.isfinite(probabilities).all():
        raise RuntimeError(
            "the curvature is not finite: the model's outputs hold NaN/inf, so mc_ggn cannot sample labels. "
            "Check the weights and the training data for NaN/inf. Weights were left unchanged."
        )
