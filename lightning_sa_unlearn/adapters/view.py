"""A module that returns logits from inputs, sharing another module's parameters under the same names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class AdaptedModule(nn.Module):
    """``module`` seen through ``logits(module, inputs)``: ``AdaptedModule(module, logits)(inputs)`` is the logits.

    It holds the very dictionaries of parameters, buffers and submodules of ``module``, so
    ``named_parameters`` gives the same names and tensors, ``torch.func.functional_call`` swaps the
    module's own tensors, and ``requires_grad`` flags and ``train``/``eval`` are the module's. Any other
    attribute is read from ``module`` (a ``forget_loss`` override may call its methods).
    """

    def __init__(self, module: nn.Module, logits: Callable[[nn.Module, Any], Tensor]) -> None:
        object.__setattr__(self, "wrapped", module)
        training = module.training
        super().__init__()
        object.__setattr__(self, "logits_of", logits)
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._modules = module._modules
        module.training = training  # nn.Module.__init__ set the flag through the property below

    @property  # type: ignore[override]
    def training(self) -> bool:
        return self.wrapped.training

    @training.setter
    def training(self, mode: bool) -> None:
        self.wrapped.training = mode

    def forward(self, inputs: Any) -> Tensor:
        return self.logits_of(self.wrapped, inputs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"{type(self.wrapped).__name__} (through its batch adapter)"
