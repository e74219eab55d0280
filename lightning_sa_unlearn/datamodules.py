"""Label-poisoning experiments (paper section 5.1) as a LightningDataModule serving the data contract."""

from __future__ import annotations

import functools
import os
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

DATASETS = ("mnist", "cifar10", "imagefolder", "synthetic")
POISONS = ("targeted", "untargeted", "backdoor", "deletion")
_SET_NAMES = ("train_set", "forget_set", "corrected_set", "retain_set", "val_set", "test_set")
_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class PoisonedLabelDataModule(pl.LightningDataModule):
    """Training images with ``num_poisoned`` flipped labels, and the loaders that unlearning needs.

    * ``poison="targeted"``: ``num_poisoned`` training samples of ``target_class`` are relabelled
      to random other classes (the paper's targeted attack on class 9).
    * ``poison="untargeted"``: ``num_poisoned`` random training samples are relabelled to random
      other classes.
    * ``poison="backdoor"``: ``num_poisoned`` training samples not of ``target_class`` get a white
      ``trigger_size``×``trigger_size`` square in their ``trigger_corner`` and the label
      ``target_class``. ``D̃_f`` is, with ``corrected_inputs="clean"`` (default), the same samples without
      the trigger, with their true labels (feature and label unlearning together); with
      ``corrected_inputs="triggered"``, the triggered inputs themselves with their true labels (what
      teaches the model that the trigger means nothing). :meth:`triggered_test_dataloader` stamps the
      trigger on the test images not of ``target_class``, for the attack success rate.
    * ``poison="deletion"``: nothing is poisoned; ``num_poisoned`` random training samples, with
      their true labels, are a deletion request (sample unlearning). There is no ``D̃_f``:
      :meth:`corrected_dataloader` returns None, and ``train_labels="corrected"`` trains on ``D_r``.
    * ``discovered=q`` (< 1): only a seeded ``round(q · num_poisoned)`` of the poisoned samples form ``D_f`` and
      ``D̃_f`` (an audit that found part of the poison); the rest stay in ``D_r`` as they were trained, wrong
      label (and trigger) included, at :attr:`unidentified_positions`. The poisoned samples, and so the
      trained and retrained models, are the same for every ``q``.
    * ``flip_to=k``: every poisoned label becomes class ``k`` instead of a random other class (a
      fixed label flip, e.g. 9 → 7). Random flips spread D_f over nine classes, so the true class
      keeps the majority and a small model barely fits them; a fixed flip does real damage.

    ``train_labels="corrected"`` serves the same training images with their true labels
    (``D_r ∪ D̃_f``), for the model retrained from scratch that unlearning is measured against.
    ``train_labels="retain"`` serves ``D_r`` as it is: retraining without the identified samples (with
    ``discovered < 1`` the unidentified poison stays in it).

    The validation split is held out of the training images before poisoning, so its labels are
    clean; by default it is what exceeds 50,000 training images (the paper's setting: MNIST 50,000
    / 10,000), or a tenth of the images when there are fewer. The official test split is the
    held-out set. The same ``seed`` gives the same split and the same poisoned samples.

    ``dataset="imagefolder"`` reads ``root/train`` and ``root/test`` in torchvision's ImageFolder
    layout (for example the CIFAR-10 JPEG copy); ``"synthetic"`` makes a small 1×28×28 task for tests.
    With ``device="cuda"`` every set is moved to the GPU once and batched there.
    """

    def __init__(
        self,
        dataset: Literal["mnist", "cifar10", "imagefolder", "synthetic"] = "mnist",
        root: str = "data",
        download: bool = False,
        poison: Literal["targeted", "untargeted", "backdoor", "deletion"] = "targeted",
        num_poisoned: int = 2500,
        target_class: int = 9,
        num_train: int | None = None,
        val_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        synthetic_size: tuple[int, int] = (1200, 400),
        train_labels: Literal["poisoned", "corrected", "retain"] = "poisoned",
        device: str | None = None,
        flip_to: int | None = None,
        trigger_size: int = 3,
        trigger_corner: Literal["bottom_right", "top_left"] = "bottom_right",
        corrected_inputs: Literal["clean", "triggered"] = "clean",
        discovered: float = 1.0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}.")
        if poison not in POISONS:
            raise ValueError(f"unknown poison {poison!r}; choose one of {POISONS}.")
        if train_labels not in ("poisoned", "corrected", "retain"):
            raise ValueError(f"train_labels must be 'poisoned', 'corrected' or 'retain', got {train_labels!r}.")
        if flip_to is not None and poison not in ("targeted", "untargeted"):
            raise ValueError(f"flip_to applies to label flips only, not to poison={poison!r}.")
        if trigger_corner not in ("bottom_right", "top_left"):
            raise ValueError(f"trigger_corner must be 'bottom_right' or 'top_left', got {trigger_corner!r}.")
        if corrected_inputs not in ("clean", "triggered"):
            raise ValueError(f"corrected_inputs must be 'clean' or 'triggered', got {corrected_inputs!r}.")
        if corrected_inputs == "triggered" and poison != "backdoor":
            raise ValueError(
                "corrected_inputs='triggered' applies to poison='backdoor' only (other poisons have no trigger)."
            )
        if trigger_size < 1:
            raise ValueError(f"trigger_size must be >= 1, got {trigger_size}.")
        if num_poisoned < 0:
            raise ValueError(f"num_poisoned must be >= 0, got {num_poisoned}.")
        if not 0 < discovered <= 1:
            raise ValueError(f"discovered must be in (0, 1] (the share of the poison that is known), got {discovered}.")
        if discovered < 1 and poison == "deletion":
            raise ValueError("discovered < 1 applies to poisons (labels or a trigger), not to a deletion request.")
        self.save_hyperparameters()
        self.dataset, self.root, self.download = dataset, root, download
        self.poison, self.num_poisoned = poison, num_poisoned
        self.target_class: int | None = target_class if poison in ("targeted", "backdoor") else None
        self.num_train, self.val_size = num_train, val_size
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed, self.synthetic_size, self.train_labels = seed, synthetic_size, train_labels
        self.device, self.flip_to = device, flip_to
        self.trigger_size, self.trigger_corner, self.corrected_inputs = trigger_size, trigger_corner, corrected_inputs
        self.discovered = discovered
        self._ready = False

    # ----------------------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        if self.dataset in ("mnist", "cifar10") and self.download:
            self._torchvision_split(train=True)
            self._torchvision_split(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        images, labels, test_images, test_labels = self._load()
        self.num_classes = int(max(labels.max(), test_labels.max())) + 1
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(labels), generator=generator)
        val_size = self.val_size if self.val_size is not None else max(len(labels) - 50_000, len(labels) // 10)
        val_index, train_index = order[:val_size], order[val_size:]
        if self.num_train is not None:
            train_index = train_index[: self.num_train]

        if self.poison == "backdoor" and self.trigger_size > min(images.shape[-2:]):
            raise ValueError(
                f"trigger_size={self.trigger_size} is larger than the {images.shape[-2]}×{images.shape[-1]} "
                "images; use a smaller trigger."
            )
        true_labels = labels[train_index]
        poisoned_labels = true_labels.clone()
        positions = self._choose_poisoned(true_labels, generator)
        shift = torch.randint(1, self.num_classes, (len(positions),), generator=generator)
        if self.poison in ("targeted", "untargeted"):
            poisoned_labels[positions] = (true_labels[positions] + shift) % self.num_classes
        if self.flip_to is not None:
            poisoned_labels[positions] = self.flip_to
        if self.poison == "backdoor":
            poisoned_labels[positions] = self.target_class
        poisoned, known = positions, self._discover(positions)  # known: D_f
        is_forget = torch.zeros(len(train_index), dtype=torch.bool)
        is_forget[known] = True
        self.poisoned_positions = poisoned
        """Positions in ``train_set`` of every poisoned sample, known or not (sorted)."""
        self.unidentified_positions = poisoned[~torch.isin(poisoned, known)]
        """Positions in ``train_set`` of the poisoned samples left out of ``D_f`` (``discovered < 1``): they stay in
        ``D_r`` with their trained labels and inputs."""

        x = images[train_index]
        self._white = images.amax(dim=(0, 2, 3))  # per channel: the trigger's colour, in normalized units
        trained_x = x.clone()
        if self.poison == "backdoor":
            trained_x[poisoned] = self.stamp_trigger(x[poisoned])
        # indices into the original training split
        self.train_indices, self.val_indices, self.poisoned_indices = train_index, val_index, train_index[poisoned]
        self.forget_set = TensorDataset(trained_x[known], poisoned_labels[known])
        corrected_x = trained_x if self.corrected_inputs == "triggered" else x
        self.corrected_set = TensorDataset(corrected_x[known], true_labels[known])
        # as trained: clean samples with their true labels, unidentified poison with its wrong labels (and trigger)
        self.retain_set = TensorDataset(trained_x[~is_forget], poisoned_labels[~is_forget])
        if self.train_labels == "retain":
            self.train_set = self.retain_set
        elif self.train_labels == "poisoned":
            self.train_set = TensorDataset(trained_x, poisoned_labels)
        elif self.poison == "deletion":  # the gold standard of sample unlearning: D_r alone
            self.train_set = self.retain_set  # (discovered is 1 here: D_r holds no poison)
        else:  # the gold standard: D_r ∪ D̃_f, the same images with true labels (no trigger)
            self.train_set = TensorDataset(x, true_labels)
        self.val_set = TensorDataset(images[val_index], labels[val_index])
        self.test_set = TensorDataset(test_images, test_labels)
        if self.poison == "backdoor":
            others = test_labels != self.target_class
            self.triggered_test_set = TensorDataset(self.stamp_trigger(test_images[others]), test_labels[others])
        if self.device is not None:
            for name in (*_SET_NAMES, "triggered_test_set"):
                if hasattr(self, name):
                    setattr(self, name, TensorDataset(*(t.to(self.device) for t in getattr(self, name).tensors)))
        self._ready = True

    def stamp_trigger(self, images: Tensor) -> Tensor:
        """A copy of ``images`` (N×C×H×W, normalized) with the white trigger square in ``trigger_corner``."""
        stamped = images.clone()
        size = self.trigger_size
        corner = slice(-size, None) if self.trigger_corner == "bottom_right" else slice(0, size)
        stamped[..., corner, corner] = self._white.to(images)[:, None, None]
        return stamped

    def _discover(self, positions: Tensor) -> Tensor:
        """The known part of the poison: ``round(discovered · n)`` of ``positions`` (at least 1), drawn by a generator
        of its own, so the poisoned samples themselves do not depend on ``discovered``; sorted."""
        if self.discovered == 1 or len(positions) == 0:
            return positions
        count = max(1, round(self.discovered * len(positions)))
        generator = torch.Generator().manual_seed(self.seed + 1_000_003)
        return positions[torch.randperm(len(positions), generator=generator)[:count]].sort().values

    def _choose_poisoned(self, true_labels: Tensor, generator: torch.Generator) -> Tensor:
        if self.flip_to is not None and not 0 <= self.flip_to < self.num_classes:
            raise ValueError(f"flip_to={self.flip_to} is outside the classes 0..{self.num_classes - 1}.")
        if self.poison == "targeted":
            if not 0 <= self.target_class < self.num_classes:
                raise ValueError(f"target_class={self.target_class} is outside the classes 0..{self.num_classes - 1}.")
            if self.flip_to == self.target_class:
                raise ValueError(f"flip_to={self.flip_to} equals target_class: the flipped labels would be correct.")
            candidates = (true_labels == self.target_class).nonzero().flatten()
        elif self.poison == "backdoor":
            if not 0 <= self.target_class < self.num_classes:
                raise ValueError(f"target_class={self.target_class} is outside the classes 0..{self.num_classes - 1}.")
            candidates = (true_labels != self.target_class).nonzero().flatten()
        else:
            candidates = torch.arange(len(true_labels))
            if self.flip_to is not None:  # a sample already of class flip_to cannot be flipped to it
                candidates = (true_labels != self.flip_to).nonzero().flatten()
        if self.num_poisoned > len(candidates):
            raise ValueError(
                f"num_poisoned={self.num_poisoned} but only {len(candidates)} training samples can be "
                f"poisoned ({self.poison}); lower num_poisoned or use more training images."
            )
        return candidates[torch.randperm(len(candidates), generator=generator)[: self.num_poisoned]].sort().values

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.dataset == "synthetic":
            return _synthetic(*self.synthetic_size)
        if self.dataset == "imagefolder":
            train, test = (_image_folder(os.path.join(self.root, split)) for split in ("train", "test"))
            mean, std = train[0].mean(dim=(0, 2, 3)), train[0].std(dim=(0, 2, 3))
            return _normalize(train[0], mean, std), train[1], _normalize(test[0], mean, std), test[1].clone()
        stats = _MNIST_STATS if self.dataset == "mnist" else _CIFAR_STATS
        (x, y), (xt, yt) = self._torchvision_split(True), self._torchvision_split(False)
        mean, std = torch.tensor(stats[0]), torch.tensor(stats[1])
        return _normalize(x, mean, std), y, _normalize(xt, mean, std), yt

    def _torchvision_split(self, train: bool) -> tuple[Tensor, Tensor]:
        import torchvision

        try:
            if self.dataset == "mnist":
                ds = torchvision.datasets.MNIST(self.root, train=train, download=self.download)
                return ds.data.unsqueeze(1).float() / 255, ds.targets.long()
            ds = torchvision.datasets.CIFAR10(self.root, train=train, download=self.download)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255, torch.tensor(ds.targets)
        except RuntimeError as error:
            raise RuntimeError(
                f"could not read {self.dataset} under root={self.root!r} ({error}). Point root at a folder "
                "holding the torchvision layout (e.g. ../shared/datasets for MNIST), or set download=True."
            ) from error

    # ----------------------------------------------------------------------------- loaders
    def _loader(self, dataset: TensorDataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        if self.device is not None:  # data already on the accelerator: batch it there, no workers, no copies
            return TensorBatches(dataset, batch_size or self.batch_size, shuffle)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def forget_dataloader(self) -> DataLoader:
        return self._loader(self.forget_set, shuffle=False, batch_size=self.eval_batch_size)

    def corrected_dataloader(self) -> DataLoader | None:
        if self.poison == "deletion":  # sample unlearning: D_f is removed, nothing replaces it
            return None
        return self._loader(self.corrected_set, shuffle=False, batch_size=self.eval_batch_size)

    def retain_dataloader(self) -> DataLoader:
        return self._loader(self.retain_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, batch_size=self.eval_batch_size)

    def triggered_test_dataloader(self) -> DataLoader | None:
        """Test images not of ``target_class`` with the trigger stamped on, true labels (``poison="backdoor"``)."""
        if self.poison != "backdoor":
            return None
        return self._loader(self.triggered_test_set, shuffle=False, batch_size=self.eval_batch_size)


class TensorBatches:
    """Batches sliced from tensors where they live (e.g. on the GPU), reshuffled each pass if ``shuffle``."""

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        x, y = self.dataset.tensors
        order = torch.randperm(len(y), device=y.device) if self.shuffle else torch.arange(len(y), device=y.device)
        for start in range(0, len(y), self.batch_size):
            index = order[start : start + self.batch_size]
            yield x[index], y[index]


def _normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


@functools.lru_cache(maxsize=2)
def _image_folder(path: str) -> tuple[Tensor, Tensor]:
    """Decode an ImageFolder once per process (the benchmarks build several datamodules on it)."""
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} does not exist; dataset='imagefolder' needs root/train and root/test.")
    folder = torchvision.datasets.ImageFolder(path)
    images = torch.stack([pil_to_tensor(folder.loader(p).convert("RGB")) for p, _ in folder.samples])
    return images.float() / 255, torch.tensor(folder.targets)


def _synthetic(num_train: int, num_test: int, num_classes: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ten smooth 1×28×28 class prototypes plus noise: learnable by PaperCNN in seconds, fixed data."""
    generator = torch.Generator().manual_seed(1234)
    coarse = torch.randn(num_classes, 1, 7, 7, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % num_classes
        return prototypes[y] + 1.0 * torch.randn(n, 1, 28, 28, generator=generator), y

    (x, y), (xt, yt) = sample(num_train), sample(num_test)
    return x, y, xt, yt
