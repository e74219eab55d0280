"""What a part sees of the run: :class:`RunContext`, the one interface between the parts and the pipeline.

Parts (curvature estimators, selection rules, updates, evaluations) and the harm guard annotate their
``run`` argument with this protocol and import nothing of the orchestration (``pipeline``, ``context``,
``callback``, ``cli``). :class:`~lightning_sa_unlearn.context.UnlearningRun` implements it. Only the
pipeline knows the order of the stages, and so which fields are filled when a part is called:

========================  ===========================================================================
filled before             fields
========================  ===========================================================================
every stage               ``model``, ``processes``, ``data``, ``loss_fn``, ``seed``, ``forget_loss``,
                          ``harm_guard``, ``target_class``, ``num_classes``, ``forget``, ``corrected``,
                          ``test``, ``triggered``
``curvature``             ``curvature`` (the estimator part)
``select``                ``curvature_result``, ``gradient`` (when the rule needs it)
``update``                ``names``, ``masks`` (the selection), ``gradient``, ``validation``,
                          ``validation_sample``, ``validation_source``, ``relabelled``
========================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from lightning_sa_unlearn.curvature.confidence import CurvatureResult
    from lightning_sa_unlearn.data import Batches, Relabelled, UnlearningData
    from lightning_sa_unlearn.functional import LossFn
    from lightning_sa_unlearn.processes import Processes


class RunContext(Protocol):
    """The run as a part reads it: data, settings, what earlier stages measured, and helpers."""

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
    curvature: Any
    """The curvature part (:class:`~lightning_sa_unlearn.curvature.Curvature`)."""
    curvature_result: CurvatureResult | None
    gradient: dict[str, Tensor] | None
    """``∇L_forget`` (eq. 7), summed over processes, of the parameters that were trainable when it was taken."""
    names: list[str]
    """The selected parameters' names (the update moves these alone)."""
    masks: dict[str, Tensor] | None
    """Entry masks of entry-level selections (None: whole parameters)."""
    validation: Iterable[Any] | None
    validation_sample: Iterable[Any] | None
    validation_source: str | None
    relabelled: Relabelled | None

    @property
    def device(self) -> torch.device: ...

    @property
    def hvp_scale(self) -> float:
        """``N / n``: Hessian-vector products on ``n`` curvature samples rescaled to the SUM loss over N."""
        ...

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

    def validation_loss(self, model: nn.Module, batches: Iterable[Any] | None = None) -> float: ...

    def stage(self, name: str) -> AbstractContextManager[None]:
        """Time the work inside under ``name`` and count its passes there."""
        ...

    def count(self, kind: str, samples: int) -> None: ...

    def seeded(self) -> AbstractContextManager[None]: ...

    def build_batches(self) -> None: ...


__all__ = ["RunContext"]
