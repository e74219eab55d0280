"""Your own forget loss (a subclass of the callback) and your own layer rule (a ``Selection`` part).

    python examples/custom_unlearning.py --data ../shared/datasets

``forget_loss`` gets one pair of aligned batches on the model's device and returns the loss whose
gradient drives the update. A ``Selection`` part's ``select(measured)`` reads
``measured.sharpness`` (``{module path: mean Hessian diagonal}``, in registration order) and returns
the module paths to update; see docs/parts.md for the other parts.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_sa_unlearn import PoisonedLabelDataModule, Selection, SharpnessAwareUnlearning
from lightning_sa_unlearn.models import PaperCNN


class FlattestConvolution(Selection):
    """The flattest layer whose path contains ``"conv"``."""

    needs_curvature = True  # the run measures the sharpness for this rule
    name = "flattest_conv"

    def select(self, measured):
        convolutions = {name: value for name, value in measured.sharpness.items() if "conv" in name}
        return [min(convolutions, key=convolutions.get)]


class MarginAscent(SharpnessAwareUnlearning):
    """Gradient ascent on the forget set with a margin: ``−Σ_{D_f} min(ℓ, margin)`` pushes the wrong labels'
    loss up, but stops pushing a sample once its loss passes ``margin`` (plain ascent is unbounded)."""

    def __init__(self, margin: float = 5.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = margin

    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        x, y = forget_batch
        losses = F.cross_entropy(pl_module(x), y, reduction="none")
        return -losses.clamp(max=self.margin).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    pl.seed_everything(0)
    datamodule = PoisonedLabelDataModule(dataset="mnist", root=args.data, num_poisoned=2500)
    callback = MarginAscent(margin=5.0, selection=FlattestConvolution())
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, callbacks=[callback])
    trainer.fit(PaperCNN(), datamodule)
    torch.set_printoptions(precision=4)
    print(callback.report.format_table())


if __name__ == "__main__":
    main()
