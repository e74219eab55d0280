"""Gradient-based updates of the selected parameters S: fine-tuning on ``D_r ∪ D̃_f`` and forget-loss descent.

* :func:`fine_tune`: SGD on ``D_r ∪ D̃_f`` over ``θ_S`` only (the paper's fine-tuning, restricted).
* :func:`forget_loss_descent`: full-batch gradient steps on paper eq. 6 over ``θ_S`` only.
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
from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode, trainable_only
from lightning_sa_unlearn.objective.stored_features import FeatureCache, Tagged
from lightning_sa_unlearn.updates.functional import (
    Batch,
    ForgetLoss,
    Masks,
    _copy,
    _reset,
    apply_first_order,
    default_forget_loss,
    forget_gradient,
    sum_loss,
)


def interleave(sources: Sequence[Iterable[Any]], rng: random.Random) -> Iterable[Any]:
    """Batches from several loaders in random order, each source drawn in proportion to what it has left.

    A sized source leaves the draw with its last batch, so ``rng`` makes one draw per batch served: processes
    that stop after the same number of batches (a capped epoch under DDP) leave it where one process does."""
    iterators = [iter(s) for s in sources]
    lengths = [sized(s) for s in sources]
    remaining = [length or 1 for length in lengths]
    while iterators:
        i = rng.choices(range(len(iterators)), weights=[max(r, 1) for r in remaining])[0]
        try:
            yield next(iterators[i])
            remaining[i] -= 1
            if lengths[i] is not None and remaining[i] <= 0:
                del iterators[i], remaining[i], lengths[i]
        except StopIteration:
            del iterators[i], remaining[i], lengths[i]


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
    cache: FeatureCache | None = None,
    above: nn.Module | None = None,
    after_epoch: Callable[[int], None] | None = None,
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
    With a ``cache`` of the frozen layers below the selection and the layers ``above`` them
    (:func:`~lightning_sa_unlearn.objective.stored_features.split_below`), epochs after the first
    train ``above`` on the stored features (:mod:`~lightning_sa_unlearn.objective.stored_features`).
    ``after_epoch(epoch)`` runs after each epoch (in eval mode, the selected parameters trainable).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 for update='fine_tune', got {epochs}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    params = dict(model.named_parameters())
    selected = [params[n] for n in names]
    frozen = {n: (~masks[n], params[n].detach()[~masks[n]].clone()) for n in names if masks and n in masks}
    if optimizer == "sgd":
        opt = torch.optim.SGD(selected, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(selected, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    steps = 0
    start = _copy(params, names)
    try:
        with eval_mode(model), torch.enable_grad(), trainable_only(model, names):
            for epoch in range(epochs):
                cached = cache is not None and cache.usable
                tagged = [Tagged(i, s) for i, s in enumerate(cache.epoch() if cached else sources)]
                for index, batch in progress(itertools.islice(interleave(tagged, rng), steps_per_epoch)):
                    x, y = batch if cached else next(batches_for(model, [batch]))
                    opt.zero_grad(set_to_none=True)
                    if cached:
                        logits = above(x)
                    elif cache is not None and epoch == 0:  # the first epoch stores what the frozen layers give
                        logits = above(cache.first_epoch(index, (x, y))[0])
                    else:
                        logits = model(x)
                    loss = loss_fn(logits, y)
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
                if cache is not None and epoch == 0:
                    cache.close()
                if after_epoch is not None:
                    after_epoch(epoch)
    except FloatingPointError:
        _reset(params, start)
        raise
    finally:
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
    start = _copy(params, names)
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
                    best_step, best_loss, best = step, loss, _copy(params, names)
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
