"""Subclassing SharpnessAwareUnlearning: your own forget loss and your own layer rule.

    python examples/custom_unlearning.py --data ../shared/datasets

``forget_loss`` gets one pair of aligned batches on the model's device and returns the loss whose
gradient drives the update. ``select_layers`` gets ``{module path: mean Hessian diagonal}`` in
registration order and returns the module paths to update; overriding it replaces the callback's
selection part (a rule of your own can also be a ``Selection`` part: see docs/parts.md).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_sa_unlearn import PoisonedLabelDataModule, SharpnessAwareUnlearning
from lightning_sa_unlearn.models import PaperCNN


class FlattestConvAscent(SharpnessAwareUnlearning):
    """Gradient ascent on the forget set with a margin, on the flattest convolution only.

    * forget loss: ``−Σ_{D_f} min(ℓ, margin)``: push the wrong labels' loss up, but stop pushing
      a sample once its loss passes ``margin`` (plain ascent is unbounded);
    * selection: the flattest layer whose path contains ``"conv"``.
    """

    def __init__(self, margin: float = 5.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.margin = margin

    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        x, y = forget_batch
        losses = F.cross_entropy(pl_module(x), y, reduction="none")
        return -losses.clamp(max=self.margin).sum()

    def select_layers(self, sharpness: dict[str, float]) -> list[str]:
        convolutions = {name: value for name, value in sharpness.items() if "conv" in name}
        return [min(convolutions, key=convolutions.get)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    pl.seed_everything(0)
    datamodule = PoisonedLabelDataModule(dataset="mnist", root=args.data, num_poisoned=2500)
    callback = FlattestConvAscent(margin=5.0)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, callbacks=[callback])
    trainer.fit(PaperCNN(), datamodule)
    torch.set_printoptions(precision=4)
    print(callback.report.format_table())


if __name__ == "__main__":
    main()
