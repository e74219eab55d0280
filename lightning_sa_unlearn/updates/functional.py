"""Unlearning updates restricted to the selected parameters S.

* :func:`forget_gradient`: ``G = ∇_θ L_forget`` with the paper's eq. 7 in SUM reduction,
  ``L_forget = Σ_{D̃_f} ℓ − Σ_{D_f} ℓ`` (sample unlearning: ``D̃_f = ∅``).
* :func:`apply_first_order`: Warnecke et al.'s closed form ``θ_S ← θ_S − τ·G_S``.
* :func:`choose_tau`: τ from a grid (τ = 0 included) by the loss on a validation set.
* :func:`fine_tune`, :func:`forget_loss_descent` (in :mod:`.descent`): SGD on ``D_r ∪ D̃_f``
  over ``θ_S`` only (the paper's fine-tuning, restricted), and gradient steps on paper eq. 6.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.functional import LossFn, batch_size, batches_for, eval_mode, same_inputs

Batch = tuple[Any, Tensor]
"""``(inputs, targets)`` as the batch adapter returns them."""
ForgetLoss = Callable[[nn.Module, Batch, "Batch | None"], Tensor]


def sum_loss(model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """``Σ_{(x,y) ∈ batch} ℓ(h(x, θ), y)`` from a mean-reduced ``loss_fn``."""
    x, y = batch
    return loss_fn(model(x), y) * batch_size(x)


def default_forget_loss(
    model: nn.Module, forget_batch: Batch, corrected_batch: Batch | None, loss_fn: LossFn = F.cross_entropy
) -> Tensor:
    """Paper eq. 7 on one pair of batches: ``Σ_{D̃_f} ℓ − Σ_{D_f} ℓ`` (without ``D̃_f`` for sample unlearning).

    When the two batches hold the same inputs (label unlearning), one forward pass serves both terms.
    """
    if corrected_batch is not None and same_inputs(forget_batch[0], corrected_batch[0]):
        logits, count = model(forget_batch[0]), batch_size(forget_batch[0])
        return (loss_fn(logits, corrected_batch[1]) - loss_fn(logits, forget_batch[1])) * count
    loss = -sum_loss(model, forget_batch, loss_fn)
    if corrected_batch is not None:
        loss = loss + sum_loss(model, corrected_batch, loss_fn)
    return loss


def paired_batches(
    model: nn.Module, forget: Iterable[Any], corrected: Iterable[Any] | None
) -> Iterable[tuple[Batch, Batch | None]]:
    """Yield ``(forget_batch, corrected_batch)`` on the model's device, checking the two sets align."""
    forget_batches = batches_for(model, forget)
    if corrected is None:
        yield from ((batch, None) for batch in forget_batches)
        return
    missing = object()
    for index, (f, c) in enumerate(
        itertools.zip_longest(forget_batches, batches_for(model, corrected), fillvalue=missing)
    ):
        if f is missing or c is missing or batch_size(f[0]) != batch_size(c[0]):
            raise ValueError(
                f"the forget and corrected sets differ in length (first difference at batch {index}). "
                "corrected_dataloader must serve the same samples as forget_dataloader, in the same "
                "order and with the same batch size; only labels or features may differ."
            )
        yield f, c


def forget_gradient(
    model: nn.Module,
    forget: Iterable[Any],
    corrected: Iterable[Any] | None = None,
    *,
    forget_loss: ForgetLoss = default_forget_loss,
    allow_empty: bool = False,
) -> dict[str, Tensor]:
    """``G = ∇_θ L_forget(θ; D_f, D̃_f)`` (paper eq. 7) for every trainable parameter, in eval mode.

    A sum over samples: gradients from disjoint shards of the forget set add up. An empty forget
    set is an error unless ``allow_empty`` (then G = 0, as for a process with an empty shard).
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    with eval_mode(model), torch.enable_grad():
        for forget_batch, corrected_batch in paired_batches(model, forget, corrected):
            loss = forget_loss(model, forget_batch, corrected_batch)
            check_forget_loss(loss, forget_loss)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    total[name].add_(g)
            count += batch_size(forget_batch[0])
    if count == 0 and not allow_empty:
        raise ValueError("the forget set is empty: forget_dataloader() served no samples. Nothing to unlearn.")
    return total


def check_forget_loss(loss: Any, forget_loss: Callable[..., Any]) -> None:
    """Refuse what autograd cannot differentiate into a gradient: a non-scalar or a detached loss."""
    name = getattr(forget_loss, "__qualname__", type(forget_loss).__name__)
    if not isinstance(loss, Tensor):
        raise TypeError(f"forget_loss ({name}) returned a {type(loss).__name__}; it must return a scalar tensor.")
    if loss.numel() != 1:
        raise ValueError(
            f"forget_loss ({name}) returned a tensor of shape {tuple(loss.shape)}; it must return one number for "
            "the batch, the SUM over its samples (e.g. loss_fn(logits, y) * len(y), or .sum() of per-sample losses)."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"forget_loss ({name}) returned a tensor that does not depend on the parameters (detached, computed "
            "under torch.no_grad(), or rebuilt from .item()). Compute it from pl_module(x) without detaching, so "
            "that its gradient can be taken."
        )


Masks = dict[str, Tensor]
"""Boolean masks per parameter name: with ``granularity="parameter"``, only True entries move."""


@torch.no_grad()
def apply_first_order(
    model: nn.Module, gradient: dict[str, Tensor], names: Sequence[str], tau: float, masks: Masks | None = None
) -> None:
    """``θ_S ← θ_S − τ·G_S`` in place, for the parameter names in ``names`` (Warnecke et al.).

    With ``masks``, ``θ_S ← θ_S − τ·(G_S ⊙ m)``: entries outside the mask are not written at all.
    """
    params = dict(model.named_parameters())
    for name in names:
        if masks is not None and name in masks:
            params[name][masks[name]] -= tau * gradient[name][masks[name]]
        else:
            params[name].sub_(gradient[name], alpha=tau)


def default_tau_grid(model: nn.Module, gradient: dict[str, Tensor], names: Sequence[str]) -> list[float]:
    """``{0} ∪ {r·10^k : k = -4, -3.5, ..., 0}`` with ``r = ‖θ_S‖ / ‖G_S‖``.

    The step ``τ·G_S`` then moves ``θ_S`` by 0.01% up to 100% of its own norm, whatever the scale
    of the loss or the size of the forget set.
    """
    params = dict(model.named_parameters())
    weight_norm = torch.sqrt(sum(params[n].detach().double().pow(2).sum() for n in names))
    grad_norm = torch.sqrt(sum(gradient[n].double().pow(2).sum() for n in names))
    if not torch.isfinite(grad_norm):
        raise FloatingPointError("the forget gradient is not finite; check the forget and corrected data.")
    if grad_norm == 0:
        return [0.0]
    ratio = float(weight_norm / grad_norm)
    return [0.0] + [ratio * 10 ** (k / 2) for k in range(-8, 1)]


def choose_tau(
    model: nn.Module,
    gradient: dict[str, Tensor],
    names: Sequence[str],
    grid: Sequence[float],
    validation_loss: Callable[[nn.Module], float],
    progress: Callable[[Iterable[float]], Iterable[float]] = lambda it: it,
    masks: Masks | None = None,
) -> tuple[float, dict[float, float]]:
    """Try ``θ_S − τ·G_S`` for each τ in ``grid``; leave the model at the τ of least validation loss.

    Returns the chosen τ and ``{τ: validation loss}``. Non-finite losses never win.
    """
    params = dict(model.named_parameters())
    start = _copy(params, names)
    losses: dict[float, float] = {}
    for tau in progress(grid):
        _reset(params, start)
        apply_first_order(model, gradient, names, tau, masks)
        losses[tau] = validation_loss(model)
    finite = {t: v for t, v in losses.items() if v == v and abs(v) != float("inf")}
    if not finite:
        raise FloatingPointError(f"every τ in the grid gave a non-finite validation loss: {losses}.")
    best = min(finite, key=lambda t: (finite[t], t))
    _reset(params, start)
    apply_first_order(model, gradient, names, best, masks)
    return best, losses


def _copy(params: dict[str, nn.Parameter], names: Sequence[str]) -> dict[str, Tensor]:
    """Detached copies of ``names``' parameters (what :func:`_reset` puts back)."""
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def _reset(params: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
    for name, value in values.items():
        params[name].copy_(value)
