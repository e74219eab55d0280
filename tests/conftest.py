"""Tiny models, data and independent references shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sa_unlearn.callback import quiet_trainer as package_quiet_trainer
from lightning_sa_unlearn.models import ImageClassifier


def relu_cnn(num_classes: int = 3) -> nn.Module:
    """ReLU + max-pool CNN on 1×8×8 inputs: piecewise linear, so diag GGN = diag H."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
        nn.ReLU(),
        nn.Linear(4, num_classes),
    ).double()


def tanh_mlp(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, num_classes)).double()


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def autograd_hessian_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy):
    """Reference: the full Hessian of the mean loss from torch.autograd.functional.hessian, then its diagonal."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    start = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def loss(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, start).diagonal()


class TinyClassifier(ImageClassifier):
    """conv → BatchNorm → ReLU → pool → fc1 → ReLU → fc2 on 1×8×8 inputs (BatchNorm buffers to guard)."""

    def __init__(self, num_classes: int = 3, hidden: int = 16) -> None:
        super().__init__(num_classes=num_classes, lr=0.01)
        self.net = nn.Sequential()
        self.net.add_module("conv", nn.Conv2d(1, 4, 3))
        self.net.add_module("bn", nn.BatchNorm2d(4))
        self.net.add_module("relu", nn.ReLU())
        self.net.add_module("pool", nn.MaxPool2d(2))
        self.net.add_module("flatten", nn.Flatten())
        self.net.add_module("fc1", nn.Linear(36, hidden))
        self.net.add_module("relu2", nn.ReLU())
        self.net.add_module("fc2", nn.Linear(hidden, num_classes))


class TensorDataModule(pl.LightningDataModule):
    """The data contract from tensors: a learnable 3-class task with some labels flipped."""

    def __init__(
        self,
        n: int = 240,
        num_forget: int = 30,
        num_classes: int = 3,
        seed: int = 0,
        with_corrected: bool = True,
        with_retain: bool = True,
        with_val: bool = True,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(num_classes, 1, 8, 8, generator=g)

        def make(count):
            y = torch.arange(count) % num_classes
            return prototypes[y] + 0.7 * torch.randn(count, 1, 8, 8, generator=g), y

        x, y = make(n)
        poisoned = y.clone()
        poisoned[:num_forget] = (y[:num_forget] + 1) % num_classes
        self.x, self.y, self.poisoned = x, y, poisoned
        self.num_forget, self.batch_size = num_forget, batch_size
        self.val, self.test = make(90), make(90)
        self.with_corrected, self.with_retain, self.with_val = with_corrected, with_retain, with_val

    def _loader(self, x, y, shuffle=False):
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(self.x, self.poisoned, shuffle=True)

    def forget_dataloader(self):
        return self._loader(self.x[: self.num_forget], self.poisoned[: self.num_forget])

    def corrected_dataloader(self):
        return self._loader(self.x[: self.num_forget], self.y[: self.num_forget]) if self.with_corrected else None

    def retain_dataloader(self):
        return (
            self._loader(self.x[self.num_forget :], self.y[self.num_forget :], shuffle=True)
            if self.with_retain
            else None
        )

    def val_dataloader(self):
        return self._loader(*self.val) if self.with_val else None

    def test_dataloader(self):
        return self._loader(*self.test)


def fit_tiny(epochs: int = 3, seed: int = 0, callbacks=(), datamodule=None):
    """A TinyClassifier trained on a TensorDataModule (with the given callbacks attached)."""
    pl.seed_everything(seed, verbose=False)
    datamodule = datamodule or TensorDataModule(seed=seed)
    model = TinyClassifier()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(callbacks))
    trainer.fit(model, datamodule)
    return model, datamodule, trainer


def quiet_trainer(**kwargs) -> pl.Trainer:
    return package_quiet_trainer(**{"accelerator": "cpu", **kwargs})


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor], *, except_names=()) -> None:
    now = state(model)
    assert now.keys() == before.keys()
    for name, value in now.items():
        if name not in except_names:
            assert torch.equal(value, before[name]), f"{name} changed"


@pytest.fixture(scope="session")
def fitted_tiny():
    """(state, datamodule) of a TinyClassifier fitted once per session; tests load copies."""
    model, datamodule, _ = fit_tiny()
    return state(model), datamodule


@pytest.fixture
def tiny_model(fitted_tiny):
    saved, datamodule = fitted_tiny
    model = TinyClassifier()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.copy_(saved[name])
    return model, datamodule
