"""Snapshot and rollback of a model's parameters and buffers: what a failed run restores."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def take_snapshot(model: nn.Module) -> dict[str, Tensor | None]:
    """A copy of every parameter and buffer of ``model``, by name; None for a buffer registered as None."""
    snapshot: dict[str, Tensor | None] = {name: t.detach().clone() for name, t in _tensors(model)}
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is None:
                snapshot[f"{module_name}.{name}" if module_name else name] = None
    return snapshot


@torch.no_grad()
def restore_snapshot(model: nn.Module, snapshot: dict[str, Tensor | None]) -> None:
    """Every tensor of ``snapshot`` copied back in place, bit for bit.

    A parameter or buffer missing from ``snapshot`` was created during the run (a forward that registers a
    buffer on its first call): it is removed, so that the model is as it was, its ``state_dict`` keys included,
    and the run's own error is the one raised (not a KeyError from here). A buffer registered as None before
    the run (filled lazily) is set back to None, its registration kept.
    """
    for name, t in list(_tensors(model)):
        saved = snapshot.get(name, ...)
        owner, _, leaf = name.rpartition(".")
        if saved is None:
            model.get_submodule(owner)._buffers[leaf] = None
        elif saved is ...:
            delattr(model.get_submodule(owner), leaf)
        else:
            t.copy_(saved)


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
