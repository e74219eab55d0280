"""Unlearning in a LightningModule written the usual way: no ``forward``, dict batches, a torchvision network.

    python examples/dict_batches_no_forward.py            # synthetic images, a few seconds on a CPU

The module keeps its network in ``self.model`` and calls it in ``training_step``; batches are dicts
``{"image": ..., "label": ...}``. A :class:`~lightning_sa_unlearn.adapters.BatchAdapter` tells the
callback where the inputs and labels sit and what returns the logits; nothing else changes. The
adapter is checked on one forget batch when ``fit`` starts, so a wrong key fails before training.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_sa_unlearn import BatchAdapter, MonteCarloGGN, SharpnessAwareUnlearning


class DictImages(Dataset):
    """Images whose class is written into their mean colour, served as dicts; ``flip`` relabels the first samples."""

    def __init__(self, size: int, classes: int, image_size: int, seed: int, flip: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (size,), generator=g)
        colours = torch.randn(classes, 3, 1, 1, generator=g)
        noise = 0.5 * torch.randn(size, 3, image_size, image_size, generator=g)
        self.images = colours[self.labels] + noise
        self.trained_labels = self.labels.clone()
        self.trained_labels[:flip] = (self.labels[:flip] + 1) % classes  # the poison: wrong labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.trained_labels[index]}


class Relabelled(Dataset):
    """The first ``count`` samples of ``images`` with their true labels (the corrected forget set)."""

    def __init__(self, images: DictImages, count: int) -> None:
        self.images, self.count = images, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images.images[index], "label": self.images.labels[index]}


class FlippedImages(pl.LightningDataModule):
    """Train on ``train`` images of which the first ``flip`` carry a wrong label; forget those."""

    def __init__(self, train: int = 512, flip: int = 64, classes: int = 4, image_size: int = 16) -> None:
        super().__init__()
        self.train_set = DictImages(train, classes, image_size, seed=0, flip=flip)
        self.val_set = DictImages(train // 4, classes, image_size, seed=1)
        self.test_set = DictImages(train // 4, classes, image_size, seed=2)
        self.flip, self.batch_size = flip, 64

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def forget_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.train_set, range(self.flip)), batch_size=self.batch_size)

    def corrected_dataloader(self) -> DataLoader:
        return DataLoader(Relabelled(self.train_set, self.flip), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class ResNetClassifier(pl.LightningModule):
    """A torchvision ResNet-18 kept in ``self.model``; the LightningModule itself has no ``forward``."""

    def __init__(self, classes: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(num_classes=classes)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


ADAPTER = BatchAdapter(inputs="image", targets="label", forward="model")
"""Dict batches, and the logits from ``self.model`` (the module has no forward)."""


def main(argv: list[str] | None = None) -> SharpnessAwareUnlearning:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=512, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--curvature-samples", type=int, default=64, help="images for the report's sharpness")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    datamodule = FlippedImages(train=args.train, flip=args.train // 8)
    callback = SharpnessAwareUnlearning(
        batch_adapter=ADAPTER,
        selection="last",
        curvature=MonteCarloGGN(samples=args.curvature_samples),  # the report's per-layer sharpness
        progress_bar=False,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[callback]
    )
    trainer.fit(ResNetClassifier(), datamodule)
    return callback


if __name__ == "__main__":
    main()
