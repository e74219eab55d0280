"""What a part sees of the run: :class:`RunContext`, the one interface between the parts and the pipeline.

Parts (curvature estimators, selection rules, updates, evaluations) and the harm guard annotate their
``run`` argument with this protocol and import nothing of the orchestration (``pipeline``, ``context``,
``callback``, ``cli``). :class:`~lightning_sa_unlearn.context.UnlearningRun` implements it.

It holds what is fixed before the first stage: the model, the data of the contract and the run's settings,
and the services every stage uses (batches of a loader for this process, progress, timing, pass counts).
What a stage measures (the forget gradient, the curvature, the selection, the validation objective) is
never on it: the pipeline passes it to the next stage as an argument (e.g.
:class:`~lightning_sa_unlearn.updates.UpdateInputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from lightning_sa_unlearn.data import Batches, UnlearningData
    from lightning_sa_unlearn.functional import LossFn
    from lightning_sa_unlearn.processes import Processes


class RunContext(Protocol):
    """The run as a part reads it: the model, the data, the settings, and helpers."""

    model: nn.Module
    """The model (as the batch adapter views it): ``model(inputs)`` gives the logits."""
    processes: Processes
    data: UnlearningData
    """The loaders of the data contract (forget, corrected, retain, train, val, test)."""
    loss_fn: LossFn
    seed: int
    forget_loss: Callable[..., Tensor]
    """``forget_loss(model, forget_batch, corrected_batch)``, paper eq. 7 by default."""
    harm_guard: bool
    target_class: int | None
    num_classes: int
    forget: Batches | None
    corrected: Batches | None
    test: Batches | None
    triggered: Batches | None

    @property
    def device(self) -> torch.device: ...

    def capped(self, max_samples: int | None) -> int | None: ...

    def batches(self, loader: Any, what: str, max_samples: int | None = None, **options: Any) -> Batches | None:
        """This process's shard of ``loader`` (None for None)."""
        ...

    def shuffled(self, loader: Any, what: str, max_samples: int | None = None) -> Iterable[Any] | None:
        """This process's share of ``loader`` in a seeded random order."""
        ...

    def whole(self, loader: Any, what: str) -> Batches | None:
        """All of ``loader`` in every process."""
        ...

    def progress(self, iterable: Iterable[Any], description: str, total: int | None) -> Iterable[Any]: ...

    def mean_loss(self, model: nn.Module, batches: Iterable[Any] | None) -> float:
        """The mean loss over every process's batches."""
        ...

    def forget_gradient(self) -> dict[str, Tensor]:
        """``∇L_forget`` (eq. 7) of the trainable parameters at the current weights, summed over processes."""
        ...

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Time the work inside under ``name`` and count its passes there."""
        ...

    def count(self, kind: str, samples: int) -> None: ...

    def seeded(self) -> AbstractContextManager[None]: ...


__all__ = ["RunContext"]
