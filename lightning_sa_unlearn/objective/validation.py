"""The validation objective: one set of validation data, chosen once, that every validated choice reads.

``J(θ) = mean_{(x,y) ∈ V} ℓ(h(x, θ), y)`` (+ ``mean_{D_f} ℓ(h(x, θ), ỹ)`` with ``D̃_f``'s labels for
``objective="validation_and_forget"``, which clean validation data cannot see a backdoor with). ``V`` is
``val_dataloader()``, else a slice of ``retain_dataloader()``; never the test set. The step-size search,
trial selection and the harm guard read it; each takes a prefix of :attr:`ValidationObjective.sample` (a seeded
random order), so any prefix is a random subset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_sa_unlearn.data import Relabelled, limit_samples
from lightning_sa_unlearn.functional import LossFn, batches_for, loss_sum
from lightning_sa_unlearn.objective.losses import sample_losses
from lightning_sa_unlearn.objective.stored_features import Recorder, StoredFeatures

if TYPE_CHECKING:
    from lightning_sa_unlearn.processes import Processes
    from lightning_sa_unlearn.run_context import RunContext

RETAIN_SLICE = "retain slice"
"""The source name of validation data cut from ``retain_dataloader()`` when there is no ``val_dataloader()``."""


@dataclass(frozen=True)
class ValidationObjective:
    """The validation data of the run and the objective on it, summed across processes.

    Args:
        batches: this process's share of the validation data, in the loader's order.
        sample: the same in a seeded random order (readers take a prefix: a random subset).
        source: where it came from, for reports and messages.
        relabelled: ``D_f``'s inputs with ``D̃_f``'s labels (a second term), or None.
        max_samples: the most samples a reader may take (the size of a retain slice; None: all of
            ``val_dataloader()``).
    """

    batches: Iterable[Any]
    sample: Iterable[Any]
    source: str
    relabelled: Relabelled | None
    max_samples: int | None
    loss_fn: LossFn
    processes: Processes
    _stores: dict[tuple[str, ...], _Store] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terms(self) -> list[Iterable[Any]]:
        """The data of each term, in random order: the validation sample, then the relabelled forget inputs."""
        return [self.sample] + ([self.relabelled] if self.relabelled is not None else [])

    def mean_loss(self, model: nn.Module, batches: Iterable[Any] | None) -> float:
        """``Σ ℓ / N`` over every process's ``batches`` (NaN for none)."""
        return self.processes.mean(*self.processes.agree(lambda: loss_sum(model, batches or [], self.loss_fn)))

    def __call__(self, model: nn.Module, batches: Iterable[Any] | None = None) -> float:
        """``J(θ)`` on all the validation data, or on this process's ``batches`` of it (e.g. a :meth:`subset`)."""
        value = self.mean_loss(model, self.batches if batches is None else batches)
        if self.relabelled is not None:
            value += self.mean_loss(model, self.relabelled)
        return value

    def subset(self, samples: int) -> list[Any]:
        """This process's share of the first ``samples`` validation samples of the random order (as a list)."""
        return list(limit_samples(self.sample, math.ceil(samples / self.processes.world_size)))

    def on_subset(self, model: nn.Module, names: Sequence[str], samples: int, record: Recorder) -> float:
        """``J(θ)`` on the first ``samples`` validation samples (every process), through the shared store of the
        layers below ``names`` while they are unchanged (:meth:`stored`)."""
        batches, features, stored = self.stored(model, names, samples, record)

        def measure() -> torch.Tensor:
            if features is None or stored is None or not features.current():
                return sample_losses(model, batches, self.loss_fn).losses
            return features.losses([batches], [stored], self.loss_fn)[0].losses

        losses = self.processes.agree(measure)
        value = self.processes.mean(float(losses.sum()), len(losses))
        if self.relabelled is not None:
            value += self.mean_loss(model, self.relabelled)
        return value

    def stored(
        self, model: nn.Module, names: Sequence[str], samples: int, record: Recorder
    ) -> tuple[list[Any], StoredFeatures | None, list[Any] | None]:
        """This process's share of the first ``samples`` validation samples (on the model's device), the split of
        ``model`` below the selected ``names`` (None: none), and the samples' outputs of the part below it.

        One split and one store serve every reader (the harm guard, then the step search): a prefix shorter
        than the longest stored so far is a slice of it, so the layers below run once per sample.
        """
        local = math.ceil(samples / self.processes.world_size)
        key = tuple(names)
        store = self._stores.get(key)
        if store is None or store.size < local and not store.whole:
            batches = list(batches_for(model, limit_samples(self.sample, local)))
            features = store.features if store else StoredFeatures.find(model, names, batches, record)
            if store is not None and features is not None:
                features.release(store.stored)
            stored = features.store(batches) if features is not None else None
            size = sum(len(y) for _, y in batches)
            store = self._stores[key] = _Store(features, batches, stored, size, whole=size < local)
        if local >= store.size:
            return store.batches, store.features, store.stored
        stored = None if store.stored is None else list(limit_samples(store.stored, local))
        return list(limit_samples(store.batches, local)), store.features, stored


@dataclass
class _Store:
    """The longest validation prefix stored so far for one selection (``whole``: all the validation data)."""

    features: StoredFeatures | None
    batches: list[Any]
    stored: list[Any] | None
    size: int
    whole: bool


def choose_validation(
    run: RunContext, samples: int, with_relabelled_forget: bool, loss_fn: LossFn | None = None
) -> ValidationObjective | None:
    """The run's validation objective: ``val_dataloader()``, else the first ``samples`` of ``retain_dataloader()``;
    None with neither. ``with_relabelled_forget`` adds ``D_f``'s inputs with ``D̃_f``'s labels as a second term."""
    data = run.data
    if data.val is not None:
        batches, sample = run.batches(data.val, "validation"), run.shuffled(data.val, "validation")
        source, cap = "val_dataloader", None
    elif data.retain is not None:
        batches = run.batches(data.retain, "retain", samples)
        sample, source, cap = run.shuffled(data.retain, "retain", samples), RETAIN_SLICE, samples
    else:
        return None
    relabelled = None
    if with_relabelled_forget and run.corrected is not None:
        relabelled = Relabelled(run.forget, run.corrected)
        source = f"{source} + forget inputs with corrected labels"
    return ValidationObjective(batches, sample, source, relabelled, cap, loss_fn or run.loss_fn, run.processes)


__all__ = ["RETAIN_SLICE", "ValidationObjective", "choose_validation"]
