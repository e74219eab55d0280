"""The context every stage of an unlearning run reads and extends: :class:`UnlearningRun`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_sa_unlearn.adapters import BatchAdapter
from lightning_sa_unlearn.adapters.checks import check_first_batch
from lightning_sa_unlearn.curvature import Curvature
from lightning_sa_unlearn.curvature.losses import ignored_label
from lightning_sa_unlearn.data import Batches, ShuffledBatches, UnlearningData, is_map_style
from lightning_sa_unlearn.functional import LossFn
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.trainers import quiet_trainer
from lightning_sa_unlearn.updates import default_forget_loss, forget_gradient, loss_sum

FAST_DEV_RUN_SAMPLES = 64


@dataclass
class UnlearningRun:
    """The run's data, settings and services (timing, pass counts, progress), the same from the first stage to
    the last; parts receive it as ``run`` (:class:`~lightning_sa_unlearn.run_context.RunContext`). What the
    stages measure is passed between them by the pipeline as arguments, never stored here."""

    trainer: pl.Trainer | None
    processes: Processes
    model: nn.Module
    data: UnlearningData
    loss_fn: LossFn = F.cross_entropy
    seed: int = 0
    forget_loss: Callable[..., Tensor] = default_forget_loss
    progress_bar: bool = False
    target_class: int | None = None
    max_samples: int | None = None
    curvature: Curvature | None = None
    harm_guard: bool = True
    adapter: BatchAdapter = field(default_factory=BatchAdapter)
    """How batches become ``(inputs, targets)``; ``model`` is already its view (``adapter.view(module)``)."""
    num_classes: int = 0
    forget: Batches | None = None
    corrected: Batches | None = None
    test: Batches | None = None
    triggered: Batches | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    passes: dict[str, dict[str, float]] = field(default_factory=dict)
    """Samples through the model per stage and kind of pass (:mod:`~lightning_sa_unlearn.passes`)."""
    stages: list[str] = field(default_factory=list)
    """The stages now running, innermost last."""

    @classmethod
    def standalone(
        cls, model: nn.Module, datamodule: Any, *, loss_fn: LossFn, seed: int, adapter: BatchAdapter | None = None
    ) -> UnlearningRun:
        """A one-process run on ``model`` and the loaders of ``datamodule`` (for evaluations on their own)."""
        trainer = quiet_trainer(accelerator="cpu" if _device(model).type == "cpu" else "auto")
        adapter = adapter or BatchAdapter()
        data = UnlearningData.resolve(datamodule, model)
        run = cls(trainer, Processes(trainer, _device(model)), adapter.view(model), data, adapter=adapter)
        run.loss_fn, run.seed, run.target_class = loss_fn, seed, getattr(datamodule, "target_class", None)
        return run

    # ------------------------------------------------------------------ helpers for parts
    @property
    def device(self) -> torch.device:
        return _device(self.model)

    @property
    def ignore_index(self) -> int | None:
        """The padding label that ``loss_fn`` skips (None: every label counts)."""
        return ignored_label(self.loss_fn)

    def capped(self, max_samples: int | None) -> int | None:
        """``max_samples`` within the run's own cap (``fast_dev_run``); None: no limit."""
        return min((v for v in (max_samples, self.max_samples) if v is not None), default=None)

    def batches(self, loader: Any, what: str, max_samples: int | None = None, **options: Any) -> Batches | None:
        """This process's shard of ``loader`` (None for None), at most ``max_samples`` samples in all."""
        if loader is None:
            return None
        limit = self.capped(max_samples)
        options.setdefault("rank", self.processes.rank)
        options.setdefault("world_size", self.processes.world_size)
        options.setdefault("ignore_index", self.ignore_index)
        return Batches(
            loader, self.num_classes, what, max_samples=limit, seed=self.seed, split=self.adapter.split, **options
        )

    def shuffled(self, loader: Any, what: str, max_samples: int | None = None) -> Iterable[Any] | None:
        """This process's share of ``loader`` in a seeded random order, so that any prefix is a random sample.

        Map-style loaders only; other loaders come as :meth:`batches` (in their own order).
        """
        if not is_map_style(loader):
            return self.batches(loader, what, max_samples)
        limit = self.capped(max_samples)
        rank, world_size = self.processes.rank, self.processes.world_size
        return ShuffledBatches(
            loader,
            self.num_classes,
            what,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            max_samples=limit,
            split=self.adapter.split,
            ignore_index=self.ignore_index,
        )

    def whole(self, loader: Any, what: str) -> Batches | None:
        """All of ``loader`` in every process (for work that has no collectives)."""
        return self.batches(loader, what, rank=0, world_size=1)

    def progress(self, iterable: Iterable[Any], description: str, total: int | None) -> Iterable[Any]:
        """A progress bar on rank 0 for steps that take more than two seconds, if enabled and writing to a terminal."""
        trainer = self.trainer
        enabled = self.progress_bar and (trainer is None or trainer.is_global_zero and _shows_progress(trainer))
        return tqdm(
            iterable,
            desc=description,
            total=total,
            leave=False,
            delay=2.0,
            disable=None if enabled else True,  # None: off when the output is not a terminal (a redirected log)
            dynamic_ncols=True,
        )

    def mean_loss(self, model: nn.Module, batches: Iterable[Any] | None) -> float:
        return self.processes.mean(*self.processes.agree(lambda: loss_sum(model, batches, self.loss_fn)))

    def forget_gradient(self) -> dict[str, Tensor]:
        """``∇L_forget`` (eq. 7) of the trainable parameters at the current weights, summed over processes;
        raises on a non-finite one."""
        local = self.processes.agree(
            lambda: forget_gradient(
                self.model, self.forget, self.corrected, forget_loss=self.forget_loss, allow_empty=True
            )
        )
        gradient = self.processes.sum_tree(local)
        bad = [name for name, g in gradient.items() if not torch.isfinite(g).all()]
        if bad:
            raise RuntimeError(
                f"the forget gradient of {bad} is not finite; check forget_loss and the "
                "forget/corrected data. Weights were left unchanged."
            )
        return gradient

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the work inside under ``name``, and count its passes there."""
        start = time.perf_counter()
        self.stages.append(name)
        try:
            yield
        finally:
            self.stages.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count(self, kind: str, samples: int) -> None:
        """Record ``samples`` passes of ``kind`` under the current stage (``"outside"`` between stages)."""
        stage = self.passes.setdefault(self.stages[-1] if self.stages else "outside", {})
        stage[kind] = stage.get(kind, 0.0) + samples

    @contextlib.contextmanager
    def seeded(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            yield

    def build_batches(self) -> None:
        forget = Batches(self.data.forget, 0, "forget", split=self.adapter.split)
        self.num_classes = check_first_batch(self.model, forget.source(), self.loss_fn, self.adapter)
        self.forget, self.corrected = (
            self.batches(self.data.forget, "forget"),
            self.batches(self.data.corrected, "corrected"),
        )
        self.test, self.triggered = (
            self.batches(self.data.test, "test"),
            self.batches(self.data.triggered_test, "triggered test"),
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _shows_progress(trainer: pl.Trainer) -> bool:
    """False when the trainer was built with ``enable_progress_bar=False``."""
    return getattr(trainer, "progress_bar_callback", None) is not None
