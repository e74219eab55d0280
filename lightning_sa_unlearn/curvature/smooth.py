"""Smooth nonlinearities: module types through which the Gauss-Newton matrix is not the Hessian."""

from __future__ import annotations

from torch import nn

SMOOTH_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name)
    for name in (
        "Tanh", "Sigmoid", "LogSigmoid", "GELU", "SiLU", "Mish", "Hardswish", "ELU", "CELU", "SELU", "Softplus",
        "Softsign", "Tanhshrink", "GLU", "Softmax", "Softmin", "Softmax2d", "LayerNorm", "GroupNorm", "RMSNorm",
        "LocalResponseNorm", "MultiheadAttention", "RNNBase", "RNNCellBase",
    )
    if hasattr(nn, name)
) + (nn.modules.instancenorm._InstanceNorm,)  # fmt: skip
"""Module types whose second derivative is not zero: through them the GGN is not the Hessian.
``LogSoftmax`` is left out: at the end of a model with ``nll_loss`` it is read as part of the loss."""


def smooth_modules(model: nn.Module) -> list[str]:
    """Names of the smooth nonlinearities among ``model``'s modules (by type; functional calls are not seen)."""
    return sorted({type(module).__name__ for module in model.modules() if isinstance(module, SMOOTH_MODULES)})
