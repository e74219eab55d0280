"""The evaluation part: a measurement of a model, taken before and/or after the update."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import nn

from lightning_sa_unlearn.functional import LossFn

if TYPE_CHECKING:
    from lightning_sa_unlearn.adapters import BatchAdapter
    from lightning_sa_unlearn.run_context import RunContext


class Evaluation:
    """Base class: ``measure(run) -> dict`` on ``run.model``, at each of ``stages``.

    Call an evaluation on any model and datamodule (one process, no trainer) with
    ``evaluation(model, datamodule)``; inside the callback the run supplies its sharded data.
    """

    key: ClassVar[str] = "custom"
    """Its entry in the report's ``seconds`` (and in ``evaluations`` for a custom one)."""
    stages: ClassVar[tuple[str, ...]] = ("before", "after")

    def check(self, run: RunContext) -> None:
        """Fail before any work when the data contract lacks what this evaluation reads."""

    def measure(self, run: RunContext) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement measure(run).")

    def report_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        """``{stage: result}`` as fields of :class:`~lightning_sa_unlearn.UnlearningReport`."""
        return {"evaluations": {self.key: results}}

    def __call__(
        self,
        model: nn.Module,
        datamodule: Any = None,
        *,
        loss_fn: LossFn = F.cross_entropy,
        seed: int = 0,
        batch_adapter: BatchAdapter | None = None,
    ) -> dict[str, Any]:
        """Measure ``model`` on the data of ``datamodule`` (then ``model``) in this process alone, with no trainer:
        a one-process run is built for the part to read.

        ``batch_adapter``: how batches and logits are read, as on the callback (default: ``(x, y)`` tuples).
        """
        from lightning_sa_unlearn.standalone import evaluate  # orchestration: imported on use, never at import

        return evaluate(self, model, datamodule, loss_fn, seed, batch_adapter)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
