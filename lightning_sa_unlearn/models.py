"""Models of the paper's Table 1, as Lightning classifiers."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(pl.LightningModule):
    """A LightningModule around ``self.net``: cross-entropy training, accuracy on val and test."""

    def __init__(self, num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test_acc", self.test_accuracy)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class PaperCNN(ImageClassifier):
    """The paper's MNIST CNN (Table 1), 28,938 parameters for 1×28×28 inputs and 10 classes.

    conv1 1→8 (3×3), ReLU, max-pool 2 → conv2 8→16 (5×5), ReLU, max-pool 2 → fc1 256→96, ReLU → fc2 96→10.
    """

    def __init__(self, num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.net = nn.Sequential()
        self.net.add_module("conv1", nn.Conv2d(1, 8, kernel_size=3))
        self.net.add_module("relu1", nn.ReLU())
        self.net.add_module("pool1", nn.MaxPool2d(2))
        self.net.add_module("conv2", nn.Conv2d(8, 16, kernel_size=5))
        self.net.add_module("relu2", nn.ReLU())
        self.net.add_module("pool2", nn.MaxPool2d(2))
        self.net.add_module("flatten", nn.Flatten())
        self.net.add_module("fc1", nn.Linear(256, 96))
        self.net.add_module("relu3", nn.ReLU())
        self.net.add_module("fc2", nn.Linear(96, num_classes))


class _BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual; a 1×1 conv-BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet20(ImageClassifier):
    """He et al.'s ResNet-20 for CIFAR (3 stages of 3 blocks, 16/32/64 channels), 272,474 parameters.

    A CPU-sized stand-in for ResNet-18: about 14× fewer multiply-adds per image (41 M against 556 M).
    """

    def __init__(self, num_classes: int = 10, lr: float = 0.05, weight_decay: float = 5e-4, momentum: float = 0.9):
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.momentum = momentum
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        in_channels = 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(3):
                layers.append(_BasicBlock(in_channels, channels, stride if block == 0 else 1))
                in_channels = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
        self.net = nn.Sequential(*layers)

    def configure_optimizers(self):
        return _sgd_one_cycle(self)


class CifarResNet18(ImageClassifier):
    """torchvision's ResNet-18 in its CIFAR form: a 3×3 stride-1 stem, no max-pool, 10 classes.

    11,173,962 parameters. (The paper's Table 1 lists 11,181,642, which is the count of the
    ImageNet form with a 7×7 stem; with 32×32 images the 3×3 stem is the usual choice.)
    """

    def __init__(self, num_classes: int = 10, lr: float = 0.05, weight_decay: float = 5e-4, momentum: float = 0.9):
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()
        from torchvision.models import resnet18

        self.momentum = momentum
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def configure_optimizers(self):
        return _sgd_one_cycle(self)


def _sgd_one_cycle(module: ImageClassifier) -> dict:
    """SGD with momentum and weight decay under a one-cycle schedule stepped per batch (CIFAR recipes)."""
    optimizer = torch.optim.SGD(
        module.parameters(), lr=module.lr, momentum=module.momentum, weight_decay=module.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=module.lr, total_steps=module.trainer.estimated_stepping_batches
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
