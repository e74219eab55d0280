"""The data contract checked on one batch: before training (``on_fit_start``) and at the start of a run."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_sa_unlearn.curvature.losses import ignored_label, output_loss
from lightning_sa_unlearn.data import NO_FORGET_SET, Batches, checked_labels, find_dataloader, head_batch
from lightning_sa_unlearn.functional import LossFn, batch_size, batches_for, eval_mode, split_batch, take


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    """Refuse, before any work, a model whose parameters hold NaN or inf: no loss on it is finite, and every
    later message would blame the loss function, the data or the update instead."""
    broken = [(name, int((~torch.isfinite(p)).sum()), p.numel()) for name, p in model.named_parameters()]
    broken = [entry for entry in broken if entry[1]]
    if not broken:
        return
    name, bad, size = broken[0]
    others = [other for other, _, _ in broken[1:]]
    also = f", and {len(others)} other parameter{'s' * (len(others) > 1)} too ({', '.join(others[:3])})"
    raise ValueError(
        f"the model's weights are not finite: {name} holds {bad} NaN or infinite entr{'y' if bad == 1 else 'ies'} "
        f"(of {size}){also if others else ''}. The checkpoint or model is broken (its training diverged, or a "
        "conversion or load failed); unlearning needs the fitted weights. Load a checkpoint from before the divergence."
    )


def non_finite_samples(batches: Iterable[Any]) -> int:
    """How many samples of ``(inputs, targets)`` batches hold NaN or inf in a floating-point input tensor."""
    count = 0
    for batch in batches:
        inputs, _ = split_batch(batch)
        tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.ndim and t.is_floating_point()]
        rows = [~torch.isfinite(t).reshape(len(t), -1).all(1) for t in tensors]
        count += int(torch.stack(rows).any(0).sum()) if rows and len({len(r) for r in rows}) == 1 else 0
    return count


@torch.no_grad()
def check_forget_set(datamodule: Any, module: nn.Module, loss_fn: LossFn, adapter: Any) -> None:
    """Before training: the forget set exists, and two of its samples pass :func:`check_first_batch` through the
    adapter's view of ``module``. A forget set that cannot be built yet (a datamodule that builds it in
    ``setup("test")``) is left for the run to check."""
    with random_states_kept():
        try:
            loader = find_dataloader("forget_dataloader", datamodule, module)
        except Exception as error:  # built later: the run checks it
            rank_zero_info(f"the forget set is not available before training ({error!r}); it is checked later.")
            return
        if loader is None:
            raise ValueError(NO_FORGET_SET)
        first = head_batch(loader, 2)
    forget = Batches(loader if first is None else [first], 0, "forget", split=adapter.split)
    check_first_batch(adapter.view(module), forget.source(), loss_fn, adapter)


def check_first_batch(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, adapter: Any) -> int:
    """Two examples of the first non-empty batch through ``model`` (a batch adapter's view); returns the classes.

    Checks that the logits are one tensor ``[B, C, ...]`` matching the targets' shape ``[B, ...]``, that
    the labels are class indices below ``C``, and that ``loss_fn`` gives a finite number on them.
    Leaves the random states of torch, ``random`` and numpy as they were (a shuffled loader or an
    augmentation draws from them).
    """
    with random_states_kept(), eval_mode(model):
        for inputs, targets in batches_for(model, batches):
            if batch_size(inputs):
                inputs, targets = take(inputs, slice(2)), targets[:2]
                logits = _logits(model, inputs, adapter)
                called = f"{type(model).__name__}.forward(x)" if adapter.is_plain else f"{model!r}, {adapter!r},"
                classes = logits_width(logits, targets, called)
                list(checked_labels([(inputs, targets)], classes, "forget", ignored_label(loss_fn)))
                _check_loss(loss_fn, logits, targets, adapter)
                return classes
    raise ValueError("the forget set is empty: forget_dataloader() served no samples. Nothing to unlearn.")


def _logits(model: nn.Module, inputs: Any, adapter: Any) -> Any:
    try:
        return model(inputs)
    except NotImplementedError as error:
        if "missing the required" not in str(error):  # nn.Module's message for a module without forward
            raise
        raise TypeError(
            f"{type(model).__name__} could not be called for logits ({error}). If the module keeps its network "
            "in an attribute and has no forward, name it: SharpnessAwareUnlearning(batch_adapter="
            "BatchAdapter(forward='model')) (or the attribute's name)."
        ) from error
    except TypeError as error:  # e.g. a forward that takes another number of arguments
        raise TypeError(
            f"calling {type(model).__name__} through {adapter!r} failed: {error}. Check the batch adapter: "
            "inputs= lists the forward's arguments in order, forward= names what returns the logits."
        ) from error


@contextlib.contextmanager
def random_states_kept() -> Iterator[None]:
    """Restore the random states of torch (CPU), Python's ``random`` and numpy on exit."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def logits_width(output: Any, targets: Tensor, called: str) -> int:
    """The number of classes from one forward's output, refusing anything but logits ``[B, C, ...]``.

    ``called`` names what produced ``output``, for the messages.
    """
    if not isinstance(output, Tensor):
        what = f"a dict with keys {sorted(output)}" if isinstance(output, dict) else f"a {type(output).__name__}"
        raise TypeError(
            f"{called} returned {what}, but unlearning needs the logits as one tensor. Return the logits "
            "from forward (keep other outputs in another method), or point the batch adapter at what returns "
            "them: BatchAdapter(forward='<submodule or method>'), or override BatchAdapter.logits."
        )
    expected = (targets.shape[0], *targets.shape[1:])
    if output.ndim < 2 or (output.shape[0], *output.shape[2:]) != expected:
        raise ValueError(
            f"{called} returned logits of shape {tuple(output.shape)} for targets of shape "
            f"{tuple(targets.shape)}. Unlearning is for classification and needs logits [B, C] for targets "
            "[B], or [B, C, d1, ...] for per-pixel or per-token targets [B, d1, ...] (torch's cross_entropy "
            "layout). For classes in the last dimension use BatchAdapter(outputs='classes_last'); for "
            "positions flattened into the batch ([B*T, C]) use BatchAdapter(outputs='flattened')."
        )
    return int(output.shape[1])


def _check_loss(loss_fn: LossFn, logits: Tensor, targets: Tensor, adapter: Any) -> None:
    rule = output_loss(loss_fn).name
    if rule in ("mse_loss", "binary_cross_entropy_with_logits"):
        raise ValueError(
            f"loss_fn is {rule}, a loss for regression or independent binary outputs, but the callback unlearns "
            "classifiers trained with cross-entropy (or nll_loss on log-probabilities, or a loss of your own on "
            "class indices). For curvature under this loss, call hessian_diagonal(model, batches, loss_fn=...) "
            "directly."
        )
    try:
        loss = loss_fn(logits, targets)
    except Exception as error:
        raise ValueError(
            f"loss_fn failed on the logits {tuple(logits.shape)} and targets {tuple(targets.shape)} that "
            f"{adapter!r} produced: {error}. Give the loss the model was trained with, on these shapes."
        ) from error
    padding_only = not bool((targets >= 0).any())  # the loss of positions that are all ignored is NaN
    scalar = isinstance(loss, Tensor) and loss.numel() == 1
    if (
        scalar
        and not padding_only
        and not math.isfinite(float(loss.detach()))
        and not bool(torch.isfinite(logits).all())
    ):
        raise ValueError(
            "the model's outputs on the first forget samples are NaN or infinite, so the loss is too: the forget "
            "inputs (or the weights) hold NaN or infinite values. Fix or drop those samples; loss_fn is not at fault."
        )
    if not scalar or not (padding_only or math.isfinite(float(loss.detach()))):
        raise ValueError(
            f"loss_fn returned {loss!r} on one forget batch; it must be a finite scalar (reduction='mean')."
        )
