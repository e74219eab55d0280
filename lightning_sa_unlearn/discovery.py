"""Finding poison that was not identified, and unlearning it too (issue #25).

After unlearning a systematic poison from the part of it that is known, the model predicts the true class for
the rest too; the unidentified poisoned samples are then those whose trained label the model now rejects.
:func:`rank_suspects` ranks the retain set by that rejection; :class:`ExtendedForgetData` moves the candidates
into ``D_f`` (in ``D̃_f`` with the unlearned model's most probable other class) for a second run:

    report = callback.unlearn(model, data)                 # round 1: D_f = the known poison
    suspects = rank_suspects(model, data.retain_dataloader(), before=fitted)
    model.load_state_dict(fitted.state_dict())             # round 2 starts again from the fitted model
    callback.unlearn(model, ExtendedForgetData(data, suspects.candidates(), suspects.candidate_labels()))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Subset

from lightning_sa_unlearn.data import is_map_style
from lightning_sa_unlearn.functional import batches_for, eval_mode
from lightning_sa_unlearn.objective.losses import per_sample_loss
from lightning_sa_unlearn.objective.stored_features import PROBE_SAMPLES, split_below

LOSS_HALVING = math.log(2)
"""The default flagging threshold: a score above ``ln 2`` means the trained label's probability at least halved."""


@dataclass(frozen=True)
class Suspects:
    """Training samples ranked by suspicion, most suspect first (every tensor in that order)."""

    positions: Tensor
    """Positions in the loader's dataset (``loader.dataset[position]``)."""
    scores: Tensor
    """``ℓ_after(x, y) − ℓ_before(x, y)`` under the trained label ``y`` (``ℓ_after`` alone without ``before``)."""
    proposed_labels: Tensor
    """The unlearned model's most probable class other than ``y``: the label a poisoned sample would get."""
    flagged: Tensor
    """``score > threshold``; with cross-entropy and ``ln 2``: the unlearned model gives ``y`` at most half the
    probability that ``before`` gave it (without ``before``: at most 1/2)."""
    passes: dict[str, int]
    """Samples through the models, by kind (:mod:`~lightning_sa_unlearn.passes`): ``forward`` for a whole
    model, ``forward_above`` for the layers above outputs that both models share."""

    def top(self, k: int) -> Tensor:
        """The positions of the ``k`` most suspect samples."""
        return self.positions[:k]

    def candidates(self) -> Tensor:
        """The positions of the flagged samples, most suspect first."""
        return self.positions[self.flagged]

    def candidate_labels(self) -> Tensor:
        """:attr:`proposed_labels` of :meth:`candidates`, in the same order."""
        return self.proposed_labels[self.flagged]


def rank_suspects(
    model: nn.Module,
    loader: Any,
    before: nn.Module | None = None,
    loss_fn: Callable[..., Tensor] = F.cross_entropy,
    threshold: float = LOSS_HALVING,
) -> Suspects:
    """Every sample of ``loader`` (a map-style DataLoader of ``(x, y)``, one class ``y`` per sample, the labels the
    model was trained on), scored by ``s = ℓ(model(x), y) − ℓ(before(x), y)``: how far unlearning moved the model
    away from the trained label. With ``before=None`` the score is ``ℓ(model(x), y)`` alone. Samples with
    ``s > threshold`` are flagged.

    One forward pass per sample and model; when the two differ only above some layer output (the unlearning
    updated the last layers), that output is computed once and both models' upper layers read it
    (:func:`shared_split`). The samples are read in dataset order (the loader's sampler and shuffling are not
    used): positions index ``loader.dataset``. Every process that calls it ranks the whole loader; under DDP,
    use the result of one process (``trainer.strategy.broadcast``) where kernels are not deterministic.
    """
    if not is_map_style(loader):
        raise ValueError(
            "rank_suspects needs a map-style DataLoader (a dataset with __getitem__), so that positions index "
            f"its dataset; got {type(loader).__name__}."
        )
    devices = {p.device for m in (model, before) if m is not None for p in m.parameters()}
    if len(devices) > 1:
        raise ValueError(f"model and before must be on one device; found {sorted(map(str, devices))}.")
    n = len(loader.dataset)
    if n == 0:
        raise ValueError("rank_suspects got an empty loader: there is nothing to rank.")
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    with eval_mode(model), eval_mode(model if before is None else before), torch.no_grad():
        probe = next((x for x, _ in batches_for(model, ordered)), None)
        split = None if before is None else shared_split(model, before, probe)
        if split is None:
            below, above, above_before = nn.Identity(), model, before
            passes = {"forward": n if before is None else 2 * n}
        else:
            (below, above, above_before), passes = split, {"forward": n, "forward_above": 2 * n}
        scores, proposed = [], []
        for x, y in batches_for(model, ordered):
            features = below(x)
            logits = above(features)
            if logits.dim() != 2 or y.dim() != 1 or bool((y < 0).any()):
                raise ValueError("rank_suspects ranks samples with one class label each (logits [B, C], labels ≥ 0).")
            score = per_sample_loss(loss_fn, logits, y).double()
            if above_before is not None:
                score = score - per_sample_loss(loss_fn, above_before(features), y).double()
            scores.append(score.cpu())
            proposed.append(logits.scatter(1, y[:, None], float("-inf")).argmax(1).cpu())
    score, labels = torch.cat(scores), torch.cat(proposed)
    order = torch.argsort(score, descending=True, stable=True)
    return Suspects(order, score[order], labels[order], score[order] > threshold, passes)


def shared_split(model: nn.Module, before: nn.Module, probe: Any) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """``(below, above, above_before)`` with ``model(x) = above(below(x))`` and ``before(x) = above_before(below(x))``:
    every parameter and buffer that differs between the two lies above ``below``
    (:func:`~lightning_sa_unlearn.objective.stored_features.split_below`, checked on ``probe``). None when nothing
    differs or no such split exists."""
    changed = _changed(model, before)
    probe = probe[:PROBE_SAMPLES] if isinstance(probe, Tensor) else probe
    split = split_below(model, changed, probe) if changed else None
    split_before = split_below(before, changed, probe) if split else None
    if split is None or split_before is None or split[2] != split_before[2]:  # not the same cut: no sharing
        return None
    return split[0], split[1], split_before[1]


def _changed(model: nn.Module, before: nn.Module) -> list[str]:
    """Names of the parameters and buffers whose values differ between two models of one architecture."""
    mine, theirs = model.state_dict(), before.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ValueError("before must be the model as it was before unlearning: same parameters and buffers.")
    return [name for name in mine if not torch.equal(mine[name], theirs[name].to(mine[name].device))]


class _Relabelled(Dataset):
    def __init__(self, samples: Dataset, labels: Tensor) -> None:
        self.samples, self.labels = samples, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.samples[index][0], self.labels[index]


class ExtendedForgetData(pl.LightningDataModule):
    """``datamodule`` with the retain samples at ``positions`` moved into the forget set: ``D_f`` gains them with
    their trained labels, ``D̃_f`` with ``labels`` (the same inputs: a backdoor's trigger stays on them), and
    ``D_r`` loses them. The training, validation and test
    loaders are ``datamodule``'s own. ``datamodule`` must be set up and serve map-style forget, corrected and
    retain loaders; ``positions`` index ``retain_dataloader().dataset`` (as :func:`rank_suspects` returns them).
    """

    def __init__(self, datamodule: Any, positions: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.source = datamodule
        corrected = datamodule.corrected_dataloader() if hasattr(datamodule, "corrected_dataloader") else None
        self._forget, self._retain = datamodule.forget_dataloader(), datamodule.retain_dataloader()
        if corrected is None:
            raise ValueError("ExtendedForgetData needs corrected_dataloader(): sample deletion has no labels to add.")
        if not all(map(is_map_style, (self._forget, corrected, self._retain))):
            raise ValueError(
                "ExtendedForgetData needs map-style forget_dataloader(), corrected_dataloader() and "
                "retain_dataloader() (DataLoaders over indexable datasets of (x, y) items)."
            )
        positions, labels = torch.as_tensor(positions, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
        size = len(self._retain.dataset)
        if positions.shape != labels.shape or positions.dim() != 1:
            raise ValueError(f"give one label per position: {tuple(positions.shape)} vs {tuple(labels.shape)}.")
        if len(positions.unique()) != len(positions) or (
            len(positions) and not 0 <= positions.min() <= positions.max() < size
        ):
            raise ValueError(f"positions must be distinct positions in the retain set (0 .. {size - 1}).")
        moved = Subset(self._retain.dataset, positions.tolist())
        keep = torch.ones(size, dtype=torch.bool)
        keep[positions] = False
        self.target_class = getattr(datamodule, "target_class", None)
        self.forget_set = ConcatDataset([self._forget.dataset, moved])
        self.corrected_set = ConcatDataset([corrected.dataset, _Relabelled(moved, labels)])
        self.retain_set = Subset(self._retain.dataset, keep.nonzero().flatten().tolist())

    def _like(self, loader: DataLoader, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            shuffle=isinstance(loader.sampler, RandomSampler),
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )

    def forget_dataloader(self) -> DataLoader:
        return self._like(self._forget, self.forget_set)

    def corrected_dataloader(self) -> DataLoader:
        return self._like(self._forget, self.corrected_set)  # D_f's batch size: the two stay aligned

    def retain_dataloader(self) -> DataLoader:
        return self._like(self._retain, self.retain_set)

    def train_dataloader(self) -> Any:
        return self.source.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.source.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.source.test_dataloader()

    def triggered_test_dataloader(self) -> Any:
        loader = getattr(self.source, "triggered_test_dataloader", None)
        return None if loader is None else loader()


__all__ = ["ExtendedForgetData", "Suspects", "rank_suspects", "shared_split"]
