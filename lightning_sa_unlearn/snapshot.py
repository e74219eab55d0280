"""Snapshot and rollback of a model's parameters and buffers: what a failed run restores."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn


def take_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer of ``model``, by name."""
    return {name: t.detach().clone() for name, t in _tensors(model)}


@torch.no_grad()
def restore_snapshot(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Every tensor of ``snapshot`` copied back in place, bit for bit.

    A parameter or buffer missing from ``snapshot`` was created during the run (a forward that registers a
    buffer on its first call): it is removed, so that the model is as it was, its ``state_dict`` keys included,
    and the run's own error is the one raised (not a KeyError from here).
    """
    for name, t in list(_tensors(model)):
        if name in snapshot:
            t.copy_(snapshot[name])
        else:
            owner, _, leaf = name.rpartition(".")
            delattr(model.get_submodule(owner), leaf)


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
