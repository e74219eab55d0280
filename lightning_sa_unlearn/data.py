"""The data contract: which dataloaders unlearning reads, and checks on what they serve.

Each loader is looked up on the datamodule first, then on the LightningModule:

===========================  ==================================================================
``train_dataloader()``       the learn set ``D = D_r ∪ D_f``, for curvature
``forget_dataloader()``      required: ``D_f`` as the model was trained on it
``corrected_dataloader()``   optional: ``D̃_f``, the same samples in the same order, fixed
``retain_dataloader()``      ``D_r``; required by ``update="fine_tune"``
``val_dataloader()``         tuning (τ)
``test_dataloader()``        held-out metrics
===========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_sa_unlearn.functional import split_batch


def find_dataloader(name: str, *owners: Any) -> Any | None:
    """Call ``owner.<name>()`` on the first owner that implements it; None if none does."""
    for owner in owners:
        method = getattr(owner, name, None)
        if owner is None or not callable(method):
            continue
        try:
            loader = method()
        except (MisconfigurationException, NotImplementedError):
            continue  # Lightning's placeholder hooks raise these when not overridden
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is not None:
            return loader
    return None


@dataclass
class UnlearningData:
    """The loaders of the data contract, resolved once."""

    train: Any
    forget: Any
    corrected: Any | None
    retain: Any | None
    val: Any | None
    test: Any | None

    @classmethod
    def resolve(cls, *owners: Any) -> UnlearningData:
        loaders = {
            field: find_dataloader(f"{field}_dataloader", *owners)
            for field in ("train", "forget", "corrected", "retain", "val", "test")
        }
        if loaders["forget"] is None:
            raise ValueError(
                "no forget set: define forget_dataloader() on your datamodule or LightningModule, "
                "serving the samples to unlearn with the labels the model was trained on."
            )
        if loaders["train"] is None:
            raise ValueError(
                "no training set: define train_dataloader() on your datamodule or LightningModule; "
                "the curvature is measured on it."
            )
        return cls(**loaders)


def sized(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def limit_samples(batches: Iterable[Any], max_samples: int | None) -> Iterator[Any]:
    """The first ``max_samples`` samples of ``batches`` (all of them when None); the last batch is cut."""
    if max_samples is None:
        yield from batches
        return
    seen = 0
    for batch in batches:
        if seen >= max_samples:
            return
        x, y = split_batch(batch)
        keep = min(x.shape[0], max_samples - seen)
        yield (x[:keep], y[:keep]) if keep < x.shape[0] else batch
        seen += keep


def checked_labels(batches: Iterable[Any], num_classes: int, what: str) -> Iterator[Any]:
    """Pass batches through, raising ValueError on a label outside ``0 .. num_classes - 1``."""
    for batch in batches:
        _, y = split_batch(batch)
        if y.numel() and not y.is_floating_point() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"the {what} set has labels in [{int(y.min())}, {int(y.max())}], but the model has "
                f"{num_classes} outputs (classes 0..{num_classes - 1}). Fix the labels or the model's output size."
            )
        yield batch
