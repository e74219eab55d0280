"""The batch adapter: the one part that knows how a user's batches and forward look."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_sa_unlearn.adapters.view import AdaptedModule
from lightning_sa_unlearn.functional import batch_size

Key = int | str
OUTPUT_LAYOUTS = ("classes", "classes_last", "flattened")


class BatchAdapter:
    r"""Turns a batch into ``(inputs, targets)``, and inputs into logits.

    Every stage reads data and calls the model through it: curvature, the forget gradient, the
    step-size search, the harm guard and the evaluations. Inside the run, ``inputs`` are what
    :meth:`split` returns (a tensor, or a tuple of tensors for a forward that takes several), each
    with the batch as its first dimension; ``targets`` hold class indices.

    Logits come back as torch's ``cross_entropy`` expects them: ``[B, C]``, or ``[B, C, d1, ...]`` for
    per-pixel or per-token classification with targets ``[B, d1, ...]``; each position is a term of
    the mean loss, and each batch row is one example of the per-example curvature.

    Args:
        inputs: where the model's inputs sit in a batch: an index (tuples, lists) or a key (dicts);
            a list of them for a forward that takes several arguments, passed in that order
            (``LightningTransformer``: ``inputs=[0, 1]``, since its forward takes the targets too).
        targets: where the class labels sit.
        forward: how to get logits from the module. None: ``module(*inputs)``. A string: the dotted
            path of a submodule or method to call instead (``"model"`` for a LightningModule that
            keeps its network in ``self.model`` and has no ``forward``). A callable
            ``forward(module, *inputs) -> logits`` (from Python; YAML takes the string forms).
        outputs: the layout of what ``forward`` returns. ``"classes"``: ``[B, C, ...]`` as above.
            ``"classes_last"``: ``[B, d1, ..., C]`` (a sequence model's ``[B, T, V]``), moved to
            ``[B, C, d1, ...]``. ``"flattened"``: ``[B·T, C]`` (``LightningTransformer``), reshaped to
            ``[B, C, T]`` with ``B`` from the inputs.

    Override :meth:`split` and :meth:`logits` for layouts these arguments cannot describe.
    """

    def __init__(
        self,
        inputs: Key | Sequence[Key] = 0,
        targets: Key = 1,
        forward: str | Callable[..., Tensor] | None = None,
        outputs: str = "classes",
    ) -> None:
        if outputs not in OUTPUT_LAYOUTS:
            raise ValueError(f"outputs={outputs!r} is not one of {OUTPUT_LAYOUTS}.")
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise ValueError("inputs=[] names no inputs: give the index or key of at least one.")
        self.inputs, self.targets, self.forward, self.outputs = inputs, targets, forward, outputs

    # ------------------------------------------------------------------ override points
    def split(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of one batch as the loader yields it."""
        if isinstance(self.inputs, (list, tuple)):
            return tuple(_item(batch, key, "inputs") for key in self.inputs), _item(batch, self.targets, "targets")
        return _item(batch, self.inputs, "inputs"), _item(batch, self.targets, "targets")

    def logits(self, module: nn.Module, inputs: Any) -> Tensor:
        """The logits of ``module`` on ``inputs`` (as :meth:`split` returned them), laid out ``[B, C, ...]``."""
        arguments = inputs if isinstance(self.inputs, (list, tuple)) else (inputs,)
        output = self._call(module, arguments)
        if not isinstance(output, Tensor) or self.outputs == "classes":
            return output
        if self.outputs == "classes_last":
            return output.movedim(-1, 1) if output.ndim > 2 else output
        return output.reshape(batch_size(inputs), -1, output.shape[-1]).movedim(-1, 1)

    # ------------------------------------------------------------------ for the run
    @property
    def is_plain(self) -> bool:
        """True for ``(x, y)`` tuples and ``module(x)`` as it is: the module then serves without a view."""
        return type(self) is BatchAdapter and (self.inputs, self.targets, self.forward, self.outputs) == (
            0,
            1,
            None,
            "classes",
        )

    def view(self, module: nn.Module) -> nn.Module:
        """``module`` as the run sees it: ``view(inputs)`` returns the logits; same parameters, same names."""
        return module if self.is_plain else AdaptedModule(module, self.logits)

    def __repr__(self) -> str:
        """How batches and logits are read (messages, and the callback's state key)."""
        forward = self.forward
        if callable(forward):  # its import path, not its address: the text keys the callback's checkpoint state
            forward = f"{getattr(forward, '__module__', '')}.{getattr(forward, '__qualname__', type(forward).__name__)}"
        fields = f"inputs={self.inputs!r}, targets={self.targets!r}, forward={forward!r}, outputs={self.outputs!r}"
        return f"{type(self).__name__}({fields})"

    def _call(self, module: nn.Module, arguments: Sequence[Any]) -> Any:
        if self.forward is None:
            return module(*arguments)
        if callable(self.forward):
            return self.forward(module, *arguments)
        target: Any = module
        for name in self.forward.split("."):
            if not hasattr(target, name):
                raise AttributeError(
                    f"{type(module).__name__} has no {self.forward!r} (forward={self.forward!r} of the batch "
                    "adapter): name the submodule or method that returns the logits, e.g. forward='model'."
                )
            target = getattr(target, name)
        return target(*arguments)


def _item(batch: Any, key: Key, role: str) -> Any:
    """``batch[key]``, or an error that shows what the batch holds and how to configure the adapter."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as error:
        if isinstance(batch, dict):
            held = f"a dict with keys {sorted(map(str, batch))}"
        elif isinstance(batch, (tuple, list)):
            held = f"a {type(batch).__name__} of {len(batch)} items"
        else:
            held = f"a {type(batch).__name__}"
        raise TypeError(
            f"the batch adapter reads the {role} at {key!r}, but the batch is {held} ({error!r}). Configure "
            f"SharpnessAwareUnlearning(batch_adapter=BatchAdapter(inputs=..., targets=...)) with the keys or "
            "indices of your batches, e.g. BatchAdapter(inputs='image', targets='label') for dict batches."
        ) from None


BATCH_ADAPTERS: dict[str, Callable[[], BatchAdapter]] = {"tuple": BatchAdapter}
