"""Unlearning updates restricted to the selected parameters S.

* :func:`forget_gradient`: ``G = ∇_θ L_forget`` with the paper's eq. 7 in SUM reduction,
  ``L_forget = Σ_{D̃_f} ℓ − Σ_{D_f} ℓ`` (sample unlearning: ``D̃_f = ∅``).
* :func:`apply_first_order`: Warnecke et al.'s closed form ``θ_S ← θ_S − τ·G_S``.
* :func:`choose_tau`: τ from a grid (τ = 0 included) by the loss on a validation set.
* :func:`fine_tune`: SGD on ``D_r ∪ D̃_f`` over ``θ_S`` only (the paper's fine-tuning, restricted).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.data import sized
from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode

Batch = tuple[Tensor, Tensor]
ForgetLoss = Callable[[nn.Module, Batch, "Batch | None"], Tensor]


def sum_loss(model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """``Σ_{(x,y) ∈ batch} ℓ(h(x, θ), y)`` from a mean-reduced ``loss_fn``."""
    x, y = batch
    return loss_fn(model(x), y) * x.shape[0]


def default_forget_loss(
    model: nn.Module, forget_batch: Batch, corrected_batch: Batch | None, loss_fn: LossFn = F.cross_entropy
) -> Tensor:
    """Paper eq. 7 on one pair of batches: ``Σ_{D̃_f} ℓ − Σ_{D_f} ℓ`` (without ``D̃_f`` for sample unlearning).

    When the two batches hold the same inputs (label unlearning), one forward pass serves both terms.
    """
    if corrected_batch is not None and torch.equal(forget_batch[0], corrected_batch[0]):
        logits, count = model(forget_batch[0]), forget_batch[0].shape[0]
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
        if f is missing or c is missing or f[0].shape[0] != c[0].shape[0]:
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
            count += forget_batch[0].shape[0]
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


@torch.no_grad()
def loss_sum(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> tuple[float, int]:
    """``(Σ ℓ, N)`` over every sample of ``batches``, in eval mode (sums from shards add up)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches_for(model, batches):
            total += float(loss_fn(model(x), y)) * x.shape[0]
            count += x.shape[0]
    return total, count


def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> float:
    """Mean of ``loss_fn`` over every sample of ``batches``, in eval mode."""
    total, count = loss_sum(model, batches, loss_fn)
    if count == 0:
        raise ValueError("cannot evaluate a loss on an empty set of batches.")
    return total / count


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
    start = {n: params[n].detach().clone() for n in names}
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


@torch.no_grad()
def _reset(params: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
    for name, value in values.items():
        params[name].copy_(value)


def interleave(sources: Sequence[Iterable[Any]], rng: random.Random) -> Iterable[Any]:
    """Batches from several loaders in random order, each source drawn in proportion to what it has left."""
    iterators = [iter(s) for s in sources]
    remaining = [sized(s) or 1 for s in sources]
    while iterators:
        i = rng.choices(range(len(iterators)), weights=[max(r, 1) for r in remaining])[0]
        try:
            yield next(iterators[i])
            remaining[i] -= 1
        except StopIteration:
            del iterators[i], remaining[i]


OPTIMIZERS = ("sgd", "adam")


def fine_tune(
    model: nn.Module,
    names: Sequence[str],
    sources: Sequence[Iterable[Any]],
    *,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    masks: Masks | None = None,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
    steps_per_epoch: int | None = None,
    average_gradients: Callable[[Sequence[Tensor]], None] | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
) -> int:
    """Minimise the mean loss over ``sources`` (``D_r`` and ``D̃_f``), updating only ``names``.

    ``optimizer`` is ``"sgd"`` (with ``momentum``) or ``"adam"``, both with ``weight_decay``.
    Runs in eval mode like every other step here, so BatchNorm statistics stay as they were.
    Parameters outside ``names`` get ``requires_grad=False`` for the duration and are never
    handed to the optimizer. With ``masks``, entries outside a mask get zero gradient and are
    copied back after every step, so momentum, Adam moments and weight decay cannot move them:
    they stay bitwise identical. ``steps_per_epoch`` caps the steps of an epoch (so that every
    process takes the same number); ``average_gradients(params)`` runs between backward and
    step (an all-reduce under data parallelism). Returns the number of optimizer steps taken.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 for update='fine_tune', got {epochs}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    params = dict(model.named_parameters())
    selected = [params[n] for n in names]
    flags = {n: p.requires_grad for n, p in params.items()}
    frozen = {n: (~masks[n], params[n].detach()[~masks[n]].clone()) for n in names if masks and n in masks}
    if optimizer == "sgd":
        opt = torch.optim.SGD(selected, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(selected, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    steps = 0
    start = {n: params[n].detach().clone() for n in names}
    try:
        for name, p in params.items():
            p.requires_grad_(name in names)
        with eval_mode(model), torch.enable_grad():
            for _ in range(epochs):
                batches = itertools.islice(interleave(sources, rng), steps_per_epoch)
                for x, y in progress(batches_for(model, batches)):
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    finite = bool(torch.isfinite(loss))
                    if not finite:  # poison the gradients, so that every process sees it after averaging
                        for p in selected:
                            if p.grad is not None:
                                p.grad.fill_(float("nan"))
                    if average_gradients is not None:
                        average_gradients(selected)
                    if not finite or not all(torch.isfinite(p.grad).all() for p in selected if p.grad is not None):
                        raise FloatingPointError(
                            f"fine-tuning stopped at step {steps + 1}: the loss or its gradient is not finite "
                            f"(lr {lr:g}, {optimizer}); the weights were restored. Lower lr, or check the retain "
                            "and corrected data for NaN or infinite inputs."
                        )
                    for name, (outside, _) in frozen.items():
                        params[name].grad[outside] = 0
                    opt.step()
                    with torch.no_grad():
                        for name, (outside, values) in frozen.items():
                            params[name][outside] = values
                    steps += 1
    except FloatingPointError:
        _reset(params, start)
        raise
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        for p in selected:
            p.grad = None
    return steps


def forget_loss_descent(
    model: nn.Module,
    names: Sequence[str],
    forget: Iterable[Any],
    corrected: Iterable[Any] | None,
    retain: Iterable[Any] | None,
    *,
    steps: int = 10,
    lr: float = 0.1,
    retain_weight: float = 1.0,
    forget_loss: ForgetLoss = default_forget_loss,
    loss_fn: LossFn = F.cross_entropy,
    masks: Masks | None = None,
    all_reduce: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda v: v,
    validation_loss: Callable[[nn.Module], float] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> int:
    """``steps`` full-batch gradient steps on paper eq. 6 over the selected parameters only.

    ``J(θ) = L_forget(θ; D_f, D̃_f) / |D_f| + λ · L_{D'_r}(θ) / |D'_r|``: eq. 6 with both sums
    taken as means (a rescaling of λ and of the step size), and ``θ_S ← θ_S − lr·∇_S J`` (masked
    entries only, with ``masks``). The forget term is ``forget_loss`` (eq. 7 by default; a
    subclass's loss gives gradient ascent, gradient difference or anything else). ``all_reduce``
    sums gradients and counts across processes. With ``validation_loss``, the parameters end at
    the step (0 included) of least validation loss: early stopping that never makes the model
    worse on validation. Returns that step (``steps`` without ``validation_loss``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 for update='forget_loss', got {steps}.")
    if retain_weight < 0:
        raise ValueError(f"retain_weight must be >= 0, got {retain_weight}.")

    def retain_loss(m: nn.Module, batch: Batch, _: Batch | None) -> Tensor:
        return sum_loss(m, batch, loss_fn)

    def gradient_and_count(batches: Iterable[Any], pair: Iterable[Any] | None, loss: ForgetLoss):
        counter = _CountingBatches(batches)
        g = forget_gradient(model, counter, pair, forget_loss=loss, allow_empty=True)
        return g, counter.count

    params = dict(model.named_parameters())
    best_step, best_loss, best = 0, math.inf, None
    start = {n: params[n].detach().clone() for n in names}
    if validation_loss is not None:
        best_loss, best = validation_loss(model), start
    with eval_mode(model), _restored_on_divergence(params, start):
        for step in progress(range(1, steps + 1)):
            g_forget, n_forget = gradient_and_count(forget, corrected, forget_loss)
            like = next(iter(g_forget.values()))  # counts travel with the gradients: same device and dtype
            terms = {f"forget/{k}": v for k, v in g_forget.items()}
            terms["count/forget"] = torch.tensor(float(n_forget), dtype=like.dtype, device=like.device)
            if retain is not None and retain_weight > 0:
                g_retain, n_retain = gradient_and_count(retain, None, retain_loss)
                terms.update({f"retain/{k}": v for k, v in g_retain.items()})
                terms["count/retain"] = torch.tensor(float(n_retain), dtype=like.dtype, device=like.device)
            terms = all_reduce(terms)
            if not all(torch.isfinite(v).all() for v in terms.values()):  # the same on every process
                raise FloatingPointError(
                    f"forget-loss descent stopped at step {step}: the forget or retain gradient is not finite "
                    f"(lr {lr:g}); the weights were restored. Lower lr or steps, or check forget_loss and the data."
                )
            n_f = float(terms["count/forget"])
            if n_f == 0:
                raise ValueError("the forget set is empty: forget_dataloader() served no samples. Nothing to unlearn.")
            direction = {n: terms[f"forget/{n}"] / n_f for n in names}
            if "count/retain" in terms and float(terms["count/retain"]) > 0:
                n_r = float(terms["count/retain"])
                direction = {n: d + retain_weight * terms[f"retain/{n}"] / n_r for n, d in direction.items()}
            apply_first_order(model, direction, names, lr, masks)
            if not all(torch.isfinite(params[n]).all() for n in names):
                raise FloatingPointError(
                    f"forget-loss descent stopped at step {step}: the parameters are no longer finite (lr {lr:g}); "
                    "the weights were restored. Lower lr or steps."
                )
            if validation_loss is not None:
                loss = validation_loss(model)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"forget-loss descent stopped at step {step}: the validation loss is {loss} (lr {lr:g}); "
                        "the weights were restored. Lower lr or steps."
                    )
                if loss < best_loss:
                    best_step, best_loss, best = step, loss, {n: params[n].detach().clone() for n in names}
    if best is None:
        return steps
    _reset(params, best)
    return best_step


@contextlib.contextmanager
def _restored_on_divergence(params: dict[str, nn.Parameter], start: dict[str, Tensor]) -> Iterator[None]:
    try:
        yield
    except FloatingPointError:
        _reset(params, start)
        raise


class _CountingBatches:
    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches, self.count = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.count += len(batch[1])
            yield batch
