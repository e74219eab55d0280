"""The data contract: which dataloaders unlearning reads, and checks on what they serve.

Each loader is looked up on the datamodule first, then on the LightningModule:

===========================  ==================================================================
``train_dataloader()``       the learn set ``D = D_r ∪ D_f``, for curvature
``forget_dataloader()``      required: ``D_f`` as the model was trained on it
``corrected_dataloader()``   optional: ``D̃_f``, the same samples in the same order, fixed
``retain_dataloader()``      ``D_r``; required by ``update="fine_tune"``
``val_dataloader()``         tuning (τ)
``test_dataloader()``        held-out metrics
``triggered_test_dataloader()``  optional: test samples with a backdoor trigger, true labels (attack success rate)
===========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset

from lightning_sa_unlearn.functional import batch_size, split_batch, take

Split = Callable[[Any], tuple[Any, torch.Tensor]]
"""A batch adapter's ``split``: a batch as the loader yields it -> ``(inputs, targets)``."""


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


NO_FORGET_SET = (
    "no forget set: define forget_dataloader() on your datamodule or LightningModule, "
    "serving the samples to unlearn with the labels the model was trained on."
)


@dataclass
class UnlearningData:
    """The loaders of the data contract, resolved once."""

    train: Any
    forget: Any
    corrected: Any | None
    retain: Any | None
    val: Any | None
    test: Any | None
    triggered_test: Any | None = None

    @classmethod
    def resolve(cls, *owners: Any) -> UnlearningData:
        loaders = {
            field: find_dataloader(f"{field}_dataloader", *owners)
            for field in ("train", "forget", "corrected", "retain", "val", "test", "triggered_test")
        }
        if loaders["forget"] is None:
            raise ValueError(NO_FORGET_SET)
        if loaders["train"] is None:
            raise ValueError(
                "no training set: define train_dataloader() on your datamodule or LightningModule; "
                "the curvature is measured on it."
            )
        for field, loader in loaders.items():
            check_reusable(loader, f"{field}_dataloader()")
        return cls(**loaders)


def check_reusable(loader: Any, name: str) -> None:
    """Refuse a loader that can be read only once (``iter(x) is x``: a generator or an iterator object).

    Unlearning reads most loaders several times (metrics before and after, one pass per τ, ...), and a
    second pass over a spent iterator is silently empty.
    """
    if isinstance(loader, Iterator):  # iter(x) is x, checked without starting a pass
        raise ValueError(
            f"{name} returned a {type(loader).__name__}, which can be read only once (iter(x) is x), but "
            "unlearning reads each loader several times. Return a DataLoader or a list of (x, y) batches instead."
        )


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
        size = batch_size(x)
        keep = min(size, max_samples - seen)
        yield (take(x, slice(keep)), y[:keep]) if keep < size else batch
        seen += keep


def checked_labels(
    batches: Iterable[Any], num_classes: int, what: str, ignore_index: int | None = None
) -> Iterator[Any]:
    """Pass batches through, raising ValueError on labels that are not class indices ``0 .. num_classes - 1``
    (or the loss's ``ignore_index``, a padding label, which must be negative)."""
    for batch in batches:
        _, y = split_batch(batch)
        if ignore_index is not None and ignore_index < 0 and isinstance(y, torch.Tensor):
            y = y[y != ignore_index]
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            kind = f"{y.dtype} labels" if isinstance(y, torch.Tensor) else f"labels of type {type(y).__name__}"
            raise ValueError(
                f"the {what} set has {kind}, but the callback unlearns classifiers and needs class indices "
                f"(an integer tensor, values 0..{num_classes - 1}). Convert them with y.long(); for regression "
                "losses or soft labels use hessian_diagonal directly."
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            padding = (
                f" Negative labels look like padding: give the loss that ignore_index (it skips {ignore_index})."
                if int(y.min()) < 0
                else ""
            )
            raise ValueError(
                f"the {what} set has labels in [{int(y.min())}, {int(y.max())}], but the model has "
                f"{num_classes} outputs (classes 0..{num_classes - 1}). Fix the labels or the model's output size."
                + padding
            )
        yield batch


def is_map_style(loader: Any) -> bool:
    """A DataLoader over an indexable, sized dataset that it reads whole (a plain sequential or random
    sampler, a fixed batch size): it can then be re-read in any subset and order. A loader with its
    own sampler (a subset, weights) is read as it is instead."""
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and sized(loader.dataset) is not None
        and type(loader.sampler) in (SequentialSampler, RandomSampler)
        and loader.batch_size is not None
    )


def shard(
    loader: Any,
    rank: int,
    world_size: int,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
    split: Split | None = None,
) -> Iterable[Any]:
    """This process's share of ``loader``: every sample counted once across processes, none repeated.

    For a map-style DataLoader the sample set is fixed first (all samples, or ``max_samples`` of
    them drawn by ``seed``), then split by index, ``indices[rank::world_size]``, and re-batched
    with the loader's batch size and collate function, in index order unless ``shuffle`` (seeded
    by ``seed`` and ``rank``); the loader's own sampler is not used. Unlike ``DistributedSampler``
    this never pads, so sums over the shards equal the sum over the whole set, whatever
    ``world_size``, and the batches are the same on every run.
    Other iterables are split batch by batch (batch i goes to rank ``i % world_size``), which
    needs the same batch order on every process. ``split`` (a batch adapter's) turns each batch into
    ``(inputs, targets)``; None: the loader serves such pairs.
    """
    if not is_map_style(loader):
        limited = limit_samples(loader if split is None else map(split, loader), max_samples)
        return limited if world_size == 1 else (b for i, b in enumerate(limited) if i % world_size == rank)
    size = len(loader.dataset)
    if max_samples is not None and max_samples < size:
        indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
    else:
        indices = torch.arange(size)
    generator = torch.Generator().manual_seed(seed + 1 + rank) if shuffle else None
    loader = DataLoader(
        Subset(loader.dataset, indices[rank::world_size].tolist()),
        batch_size=loader.batch_size or 1,
        shuffle=shuffle,
        generator=generator,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
    return loader if split is None else Adapted(loader, split)


class Adapted:
    """``split(batch)`` for each batch of a loader, with the loader's length."""

    def __init__(self, loader: Iterable[Any], split: Split) -> None:
        self.loader, self.split = loader, split

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        return map(self.split, self.loader)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


class Batches:
    """This process's shard of a loader, with labels checked; iterable many times (one pass per τ)."""

    def __init__(
        self,
        loader: Any,
        num_classes: int,
        what: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        seed: int = 0,
        shuffle: bool = False,
        split: Split = split_batch,
        ignore_index: int | None = None,
    ) -> None:
        self.loader, self.num_classes, self.what, self.ignore_index = loader, num_classes, what, ignore_index
        self.options = dict(
            rank=rank, world_size=world_size, max_samples=max_samples, seed=seed, shuffle=shuffle, split=split
        )

    def source(self) -> Iterable[Any]:
        return shard(self.loader, **self.options)

    def __iter__(self) -> Iterator[Any]:
        return checked_labels(self.source(), self.num_classes, self.what, self.ignore_index)

    def __len__(self) -> int:
        length = sized(self.source())
        if length is None:
            raise TypeError(f"the {self.what} loader has no length")
        return length


class Relabelled:
    """``(x of a forget batch, y of the aligned corrected batch)``: D_f's inputs under D̃_f's labels."""

    def __init__(self, inputs: Iterable[Any], labels: Iterable[Any]) -> None:
        self.inputs, self.labels = inputs, labels

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for forget_batch, corrected_batch in zip(self.inputs, self.labels):
            yield split_batch(forget_batch)[0], split_batch(corrected_batch)[1]


def dataset_size(loader: Any) -> int | None:
    return len(loader.dataset) if is_map_style(loader) else None


def training_set_size(loader: Any, split: Split = split_batch) -> int:
    """``N``, the number of training samples: ``len(dataset)`` when the loader's dataset has a length, else
    counted in one pass over ``loader`` (an IterableDataset without ``__len__``, or a list of batches)."""
    size = dataset_size(loader)
    if size is None and isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        size = sized(loader.dataset)  # the size the dataset declares
    if size is None:
        size = sum(len(split(batch)[1]) for batch in loader)
        rank_zero_info(
            f"counted {size} training samples in one pass over train_dataloader() (its dataset has no len()); "
            "give the dataset a __len__ to skip this pass."
        )
    if size == 0:
        raise ValueError("the training set is empty: train_dataloader() served no samples.")
    return size


def check_aligned(forget: Any, corrected: Any) -> None:
    """Fail early when the forget and corrected loaders cannot serve the same samples in the same order."""
    if corrected is not None and is_map_style(forget) and is_map_style(corrected):
        if len(forget.dataset) != len(corrected.dataset) or forget.batch_size != corrected.batch_size:
            raise ValueError(
                f"the forget and corrected sets differ in length or batch size ({len(forget.dataset)} vs "
                f"{len(corrected.dataset)} samples, batch sizes {forget.batch_size} vs {corrected.batch_size}). "
                "corrected_dataloader must serve the same samples as forget_dataloader, in the same order "
                "and with the same batch size; only labels or features may differ."
            )


def sample_units(
    loader: Any, *, seed: int, max_samples: int | None, unit_size: int | None = None
) -> list[Tensor] | None:
    """A seeded random order of a map-style loader's samples (at most ``max_samples``), in units of its batch size.

    Units are the same whatever the number of processes, so a sequential pass that stops after a
    number of units reads the same samples on one process or several. None for other loaders.
    """
    if not is_map_style(loader):
        return None
    order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))
    if max_samples is not None:
        order = order[:max_samples]
    return list(order.split(unit_size or loader.batch_size or 1))


def head_batch(loader: Any, count: int) -> Any | None:
    """The first ``count`` samples of a map-style loader's dataset as one batch (None for other loaders)."""
    if not is_map_style(loader) or len(loader.dataset) == 0:
        return None
    return unit_batch(loader, torch.arange(min(count, len(loader.dataset))))


def unit_batch(loader: Any, indices: Tensor) -> Any:
    """The samples ``indices`` of a map-style loader's dataset as one batch, collated as the loader would."""
    return loader.collate_fn([loader.dataset[i] for i in indices.tolist()])


class ShuffledBatches:
    """A map-style loader's samples in a seeded random order, one unit (batch) in ``world_size`` for this process.

    Any prefix is a random sample of the set, whatever order the dataset keeps (e.g. sorted by class).
    """

    def __init__(
        self,
        loader: Any,
        num_classes: int,
        what: str,
        *,
        seed: int,
        rank: int,
        world_size: int,
        max_samples: int | None,
        split: Split = split_batch,
        ignore_index: int | None = None,
    ) -> None:
        self.loader, self.num_classes, self.what, self.split = loader, num_classes, what, split
        self.ignore_index = ignore_index
        self.units = sample_units(loader, seed=seed, max_samples=max_samples) or []
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Any]:
        batches = (self.split(unit_batch(self.loader, u)) for u in self.units[self.rank :: self.world_size])
        return checked_labels(batches, self.num_classes, self.what, self.ignore_index)
