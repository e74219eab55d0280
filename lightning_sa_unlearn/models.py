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
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
