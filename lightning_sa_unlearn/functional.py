"""Small helpers shared by the curvature, selection and update modules.

Everything here works on a plain ``torch.nn.Module`` and needs no Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A loss ``loss_fn(logits, targets)`` that returns the MEAN over the batch (torch's default)."""


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Detached views of the parameters with ``requires_grad``, keyed as in ``named_parameters``."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def require_trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is False). "
            "Unfreeze the layers you want to unlearn in before calling this."
        )
    return params


def model_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach() for name, b in model.named_buffers()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, and restore each module's own flag afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def trainable_only(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """``requires_grad`` True on the parameters in ``names`` and False on every other for the block (``names``
    None: the flags are left as they are), then every parameter's flag as it was before, whatever happens."""
    params = dict(model.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    if names is not None:
        chosen = set(names)
        for name, p in params.items():
            p.requires_grad_(name in chosen)
    try:
        yield model
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` from a batch given as a tuple or list whose first two items are inputs and targets.

    Inside a run, batches have already passed the batch adapter and are such pairs
    (:class:`~lightning_sa_unlearn.adapters.BatchAdapter`).
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"expected each batch to be a tuple (inputs, targets), got {type(batch).__name__}. "
        "Return (x, y) pairs from your dataloaders, or describe your batches with a BatchAdapter."
    )


def batch_size(inputs: Any) -> int:
    """The number of examples in ``inputs``: the first dimension of a tensor, or of a tuple's first tensor."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    for leaf in tree_leaves(inputs):
        if isinstance(leaf, Tensor):
            return leaf.shape[0]
    raise TypeError(f"inputs of type {type(inputs).__name__} hold no tensor, so they have no batch dimension.")


def take(inputs: Any, index: Any) -> Any:
    """``inputs[index]`` along the batch dimension, for a tensor or each tensor of a tuple or dict."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) else t, inputs)


def concatenate(parts: list[Any]) -> Any:
    """Inputs of several batches as one batch (tensors, or tuples and dicts of them)."""
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return tree_map(lambda *leaves: torch.cat(leaves), *parts)


def same_inputs(a: Any, b: Any) -> bool:
    """True when two inputs hold equal tensors (and equal everything else)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return False
    for u, v in zip(leaves_a, leaves_b):
        same = (u.shape == v.shape and torch.equal(u, v)) if isinstance(u, Tensor) and isinstance(v, Tensor) else u == v
        if not same:
            return False
    return True


def to_model(batch: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Tensor]:
    """Move a batch to the model's device; floating inputs take the model's dtype."""
    x, y = split_batch(batch)

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return move(x) if isinstance(x, Tensor) else tree_map(move, x), y.to(device)


def batches_for(model: nn.Module, batches: Iterable[Any]) -> Iterator[tuple[Any, Tensor]]:
    device, dtype = model_device_and_dtype(model)
    for batch in batches:
        yield to_model(batch, device, dtype)


def stateless_loss(model: nn.Module, buffers: dict[str, Tensor], loss_fn: LossFn) -> Callable[..., Tensor]:
    """``loss(params, x, y)``: the model's mean loss on a batch as a pure function of ``params``."""

    def loss(params: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, (params, buffers), (x,)), y)

    return loss


def stateless_logits(model: nn.Module, buffers: dict[str, Tensor]) -> Callable[..., Tensor]:
    def logits(params: dict[str, Tensor], x: Any) -> Tensor:
        return functional_call(model, (params, buffers), (x,))

    return logits


def tree_add_(total: dict[str, Tensor] | None, part: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accumulate ``part`` into ``total`` in place (``total`` may start as None)."""
    if total is None:
        return {k: v.clone() for k, v in part.items()}
    for k, v in part.items():
        total[k].add_(v)
    return total


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def loss_sum(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> tuple[float, int]:
    """``(Σ ℓ, N)`` over every sample of ``batches``, in eval mode (sums from shards add up)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in batches_for(model, batches):
            total += float(loss_fn(model(x), y)) * batch_size(x)
            count += batch_size(x)
    return total, count


def mean_loss(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> float:
    """Mean of ``loss_fn`` over every sample of ``batches``, in eval mode."""
    total, count = loss_sum(model, batches, loss_fn)
    if count == 0:
        raise ValueError("cannot evaluate a loss on an empty set of batches.")
    return total / count
