"""Counting the samples that pass through a model, per kind of pass (priced in :mod:`~lightning_sa_unlearn.passes`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

PASS_KINDS = ("forward_backward", "forward", "forward_backward_above", "forward_above")
UNLEARNING_STAGES = ("forget_gradient", "curvature", "selection", "update", "harm_guard")
"""The unlearning itself; every other stage (evaluations, report-only curvature) is reporting."""


def count_samples(module: nn.Module, record: Callable[[str, int], None], suffix: str = "") -> RemovableHandle:
    """A forward pre-hook calling ``record(kind + suffix, samples)`` for every batch ``module`` receives.

    The kind is ``forward_backward`` with gradients on, ``forward`` otherwise. Calls inside ``vmap``
    (per-example computations, whose batch dimension is hidden) are not counted.
    """

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        leaf = next((t for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)
        if leaf is None or leaf.dim() == 0 or torch._C._functorch.is_batchedtensor(leaf):
            return
        record(("forward_backward" if torch.is_grad_enabled() else "forward") + suffix, leaf.shape[0])

    return module.register_forward_pre_hook(hook)
