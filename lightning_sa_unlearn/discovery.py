"""Finding poison that was not identified: rank training samples by how much the unlearned model rejects their
trained labels (issue #25).

After unlearning a systematic poison from the part of it that is known, the model predicts the true class for
the rest too; the unidentified poisoned samples are then those whose trained label the model now disagrees with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_sa_unlearn.data import is_map_style
from lightning_sa_unlearn.objective.losses import sample_losses


@dataclass(frozen=True)
class Suspects:
    """Training samples ranked by suspicion, most suspect first."""

    positions: Tensor
    """Positions in the loader's dataset (``loader.dataset[position]``)."""
    scores: Tensor
    """``ℓ_after(x, y) − ℓ_before(x, y)`` under the trained label ``y`` (``ℓ_after`` alone without ``before``)."""

    def top(self, k: int) -> Tensor:
        """The positions of the ``k`` most suspect samples."""
        return self.positions[:k]


def rank_suspects(
    model: nn.Module,
    loader: Any,
    before: nn.Module | None = None,
    loss_fn: Callable[..., Tensor] = F.cross_entropy,
) -> Suspects:
    """Every sample of ``loader`` (a map-style DataLoader of ``(x, y)`` with the labels the model was trained on),
    scored by ``s = ℓ(model(x), y) − ℓ(before(x), y)``: how far unlearning moved the model away from the trained
    label. With ``before=None`` the score is ``ℓ(model(x), y)`` alone. One forward pass per sample and model.

    The samples are read in dataset order (the loader's own sampler and shuffling are not used), so that the
    returned positions index ``loader.dataset``.
    """
    if not is_map_style(loader):
        raise ValueError(
            "rank_suspects needs a map-style DataLoader (a dataset with __getitem__), so that positions index "
            f"its dataset; got {type(loader).__name__}."
        )
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size or 256, shuffle=False)
    scores = sample_losses(model, ordered, loss_fn).losses
    if before is not None:
        scores = scores - sample_losses(before, ordered, loss_fn).losses
    order = torch.argsort(scores, descending=True, stable=True)
    return Suspects(positions=order, scores=scores[order])


__all__ = ["Suspects", "rank_suspects"]
