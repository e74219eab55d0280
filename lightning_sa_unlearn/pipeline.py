"""The unlearning run: a few stages over one context, :class:`UnlearningRun`.

Stages, in order (each computes only what the configured parts declared they need):

1. ``prepare``: resolve the data contract, check every part against it, build this process's batches;
2. ``evaluate("before")``: held-out metrics and the other evaluations;
3. ``forget_gradient``: ``∇L_forget`` (eq. 7), if the selection or the update needs it;
4. ``curvature``: ``diag H`` (section 4.1), if a part needs it or the user configured an estimator;
5. ``select``: per-layer sharpness, then the selection rule;
6. ``update``: the validation set if the update reads one, then the update on the selected parameters;
7. ``evaluate("after")``, then the report.

The context carries what earlier stages measured. The callback wraps a run in snapshot and rollback.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_sa_unlearn.curvature import Curvature, CurvatureResult, selection_margin
from lightning_sa_unlearn.data import Batches, Relabelled, UnlearningData, check_aligned, training_set_size
from lightning_sa_unlearn.evaluations import Evaluation
from lightning_sa_unlearn.functional import LossFn, batches_for, require_trainable_parameters
from lightning_sa_unlearn.guard import HarmGuard
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.selection import (
    Measurements,
    Selected,
    Selection,
    layer_sharpness,
    newton_decrement,
    trainable_layers,
)
from lightning_sa_unlearn.updates import Update, default_forget_loss, forget_gradient, loss_sum

FAST_DEV_RUN_SAMPLES = 64


@dataclass
class UnlearningRun:
    """The context every stage reads and extends; parts receive it as ``run``."""

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
    num_classes: int = 0
    forget: Batches | None = None
    corrected: Batches | None = None
    test: Batches | None = None
    triggered: Batches | None = None
    gradient: dict[str, Tensor] | None = None
    curvature_result: CurvatureResult | None = None
    training_size: int = 0
    measurements: Measurements | None = None
    decrement: dict[str, float] | None = None
    names: list[str] = field(default_factory=list)
    masks: dict[str, Tensor] | None = None
    validation: Iterable[Any] | None = None
    validation_source: str | None = None
    relabelled: Relabelled | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def standalone(cls, model: nn.Module, datamodule: Any, *, loss_fn: LossFn, seed: int) -> UnlearningRun:
        """A one-process run on ``model`` and the loaders of ``datamodule`` (for evaluations on their own)."""
        from lightning_sa_unlearn.callback import quiet_trainer

        trainer = quiet_trainer(accelerator="cpu" if _device(model).type == "cpu" else "auto")
        run = cls(trainer, Processes(trainer, _device(model)), model, UnlearningData.resolve(datamodule, model))
        run.loss_fn, run.seed, run.target_class = loss_fn, seed, getattr(datamodule, "target_class", None)
        return run

    # ------------------------------------------------------------------ helpers for parts
    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def batches(self, loader: Any, what: str, max_samples: int | None = None, **options: Any) -> Batches | None:
        """This process's shard of ``loader`` (None for None), at most ``max_samples`` samples in all."""
        if loader is None:
            return None
        limit = min((v for v in (max_samples, self.max_samples) if v is not None), default=None)
        options.setdefault("rank", self.processes.rank)
        options.setdefault("world_size", self.processes.world_size)
        return Batches(loader, self.num_classes, what, max_samples=limit, seed=self.seed, **options)

    def whole(self, loader: Any, what: str) -> Batches | None:
        """All of ``loader`` in every process (for work that has no collectives)."""
        return self.batches(loader, what, rank=0, world_size=1)

    def progress(self, iterable: Iterable[Any], description: str, total: int | None) -> Iterable[Any]:
        """A progress bar on rank 0 for steps that take more than two seconds, if enabled."""
        trainer = self.trainer
        enabled = self.progress_bar and (trainer is None or trainer.is_global_zero and _shows_progress(trainer))
        return tqdm(
            iterable, desc=description, total=total, leave=False, delay=2.0, disable=not enabled, dynamic_ncols=True
        )

    def mean_loss(self, model: nn.Module, batches: Iterable[Any] | None) -> float:
        total, count = self.processes.agree(lambda: loss_sum(model, batches, self.loss_fn))
        total, count = self.processes.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / count if count else float("nan")

    def validation_loss(self, model: nn.Module, batches: Iterable[Any] | None = None) -> float:
        """The validation objective: mean validation loss (plus the relabelled forget loss, if asked)."""
        loss = self.mean_loss(model, self.validation if batches is None else batches)
        if self.relabelled is not None and batches is None:
            loss += self.mean_loss(model, self.relabelled)
        return loss

    @property
    def hvp_scale(self) -> float:
        """``N / n``: Hessian-vector products on ``n`` curvature samples, rescaled to the SUM loss over N."""
        return self.training_size / max(self.curvature_result.samples, 1)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def seeded(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            yield

    def build_batches(self) -> None:
        self.num_classes = _num_classes(self.model, self.data.forget)
        self.forget, self.corrected = (
            self.batches(self.data.forget, "forget"),
            self.batches(self.data.corrected, "corrected"),
        )
        self.test, self.triggered = (
            self.batches(self.data.test, "test"),
            self.batches(self.data.triggered_test, "triggered test"),
        )


def run_unlearning(
    run: UnlearningRun, selection: Selection, update: Update, evaluations: list[Evaluation], measure_curvature: bool
) -> UnlearningReport:
    """Every stage on ``run.model``; raises (leaving restoration to the caller) on any failure."""
    total_start = time.perf_counter()
    require_trainable_parameters(run.model)
    layers = trainable_layers(run.model)
    check_aligned(run.data.forget, run.data.corrected)
    update.check(run)
    for evaluation in evaluations:
        evaluation.check(run)
    selection.check(list(layers))
    run.build_batches()
    results: dict[Evaluation, dict[str, Any]] = {evaluation: {} for evaluation in evaluations}

    def evaluate(stage: str) -> None:
        for evaluation in evaluations:
            if stage in evaluation.stages:
                with run.stage(evaluation.key):
                    results[evaluation][stage] = evaluation.measure(run)

    evaluate("before")
    if selection.needs_forget_gradient or update.needs_forget_gradient:
        with run.stage("forget_gradient"):
            run.gradient = _forget_gradient(run)
    if measure_curvature or selection.needs_curvature or update.needs_curvature:
        with run.stage("curvature"):
            run.curvature_result = run.curvature.measure(run)
    run.training_size = training_set_size(run.data.train) if run.curvature_result else 0
    with run.stage("selection"):
        selected, margin = _select(run, selection, layers)
    _prepare_validation(run, update)
    guard = HarmGuard.start(run, update)  # the validation objective per sample, before (None: guard off)
    with run.stage("update"), _frozen_except(run.model, run.names):
        outcome = update.apply(run)
        _check_finite(run, update)
    guarded = guard.check(run, update, outcome) if guard is not None else None  # raises on a harmful update
    evaluate("after")
    run.seconds["total"] = time.perf_counter() - total_start
    fields: dict[str, Any] = {}
    for evaluation, stages in results.items():
        for name, value in evaluation.report_fields(stages).items():
            fields[name] = {**fields.get(name, {}), **value} if name == "evaluations" else value
    measured = run.measurements
    uses_validation = outcome.get("tau_search") or update.validation() is not None and "tau" not in outcome
    return UnlearningReport(
        layer_sharpness=measured.sharpness or {},
        selected_layers=selected,
        num_updated_parameters=_count_updated(run.model, run.names, run.masks),
        tau=outcome.get("tau"),
        seconds=run.seconds,
        update=update.name,
        selection=selection.name,
        curvature=run.curvature.name if run.curvature_result else None,
        curvature_samples=run.curvature_result.samples if run.curvature_result else 0,
        tau_search=outcome.get("tau_search", []),
        validation_source=run.validation_source if uses_validation else None,
        update_steps=outcome.get("steps"),
        granularity=selection.granularity,
        newton_decrement=run.decrement or {},
        sharpness_standard_error=measured.standard_errors or {},
        selection_margin=margin,
        solver=outcome.get("solver"),
        fallback=outcome.get("fallback"),
        harm_guard=guarded.to_dict() if guarded is not None else None,
        **fields,
    )


def _forget_gradient(run: UnlearningRun) -> dict[str, Tensor]:
    local = run.processes.agree(
        lambda: forget_gradient(run.model, run.forget, run.corrected, forget_loss=run.forget_loss, allow_empty=True)
    )
    gradient = run.processes.sum_tree(local)
    bad = [name for name, g in gradient.items() if not torch.isfinite(g).all()]
    if bad:
        raise RuntimeError(
            f"the forget gradient of {bad} is not finite; check forget_loss and the "
            "forget/corrected data. Weights were left unchanged."
        )
    return gradient


def _select(run: UnlearningRun, selection: Selection, layers: dict[str, list[str]]) -> tuple[list[str], Any]:
    """Apply the rule to what was measured; set ``run.names`` and ``run.masks``; returns the layers and margin."""
    result = run.curvature_result
    measured = Measurements(run.model, layers, gradient=run.gradient)
    if result is not None:
        measured.sharpness = layer_sharpness(run.model, result.diagonal)
        measured.standard_errors = result.statistics.standard_errors()
        measured.diagonal = result.diagonal
        # H of the SUM loss (eq. 2), estimated from the curvature samples
        measured.diagonal_sum = {name: d * run.training_size for name, d in result.diagonal.items()}
        measured.damping = run.curvature.damping
    run.measurements = measured
    run.decrement = _decrement(measured)
    chosen = run.processes.broadcast(run.processes.agree(lambda: selection.select(measured)))
    if not isinstance(chosen, Selected):
        chosen = Selected(list(chosen))
    names = list(layers)
    if (
        not chosen.layers
        or any(n not in layers for n in chosen.layers)
        or len(set(chosen.layers)) != len(chosen.layers)
    ):
        raise ValueError(
            f"the selection returned {chosen.layers}, which must be a non-empty list of distinct names from {names}."
        )
    masks = chosen.masks
    run.names = [n for layer in chosen.layers for n in layers[layer] if masks is None or n in masks]
    run.masks = masks
    margin = None
    if masks is None and result is not None:
        margin = selection_margin(measured.sharpness, result.statistics, chosen.layers, selection.name)
    if margin is not None and margin["lead_in_standard_errors"] < 2:  # NaN (one batch): no estimate
        rank_zero_warn(
            f"the selected layer {margin['selected']!r} leads the runner-up {margin['runner_up']!r} by "
            f"{margin['lead']:.3g}, only {margin['lead_in_standard_errors']:.2f} standard errors of the "
            f"curvature estimate ({run.curvature.name}, {result.samples} samples): another sample could "
            "select the other layer. Raise the curvature's samples (or num_probes / labels_per_example)."
        )
    return chosen.layers, margin


def _prepare_validation(run: UnlearningRun, update: Update) -> None:
    spec = update.validation()
    if spec is None:
        return
    data = run.data
    if data.val is not None:
        run.validation, run.validation_source = run.batches(data.val, "validation"), "val_dataloader"
    elif data.retain is not None:
        run.validation, run.validation_source = run.batches(data.retain, "retain", spec.samples), "retain slice"
    if spec.objective == "validation_and_forget" and run.validation is not None:
        run.relabelled = Relabelled(run.forget, run.corrected)
        run.validation_source = f"{run.validation_source} + forget inputs with corrected labels"


def _check_finite(run: UnlearningRun, update: Update) -> None:
    after = run.validation_loss(run.model) if run.validation is not None else run.mean_loss(run.model, run.forget)
    params = dict(run.model.named_parameters())
    if not all(torch.isfinite(params[n]).all() for n in run.names) or not math.isfinite(after):
        raise RuntimeError(
            f"the update made the model non-finite (loss {after}); the weights were restored. "
            "Lower the step size, lr or steps, raise the curvature's damping, or check the forget loss."
        )


def _decrement(measured: Measurements) -> dict[str, float] | None:
    if measured.gradient is None or measured.diagonal_sum is None:
        return None
    return newton_decrement(measured.model, measured.gradient, measured.diagonal_sum, measured.damping)


def _count_updated(model: nn.Module, names: list[str], masks: dict[str, Tensor] | None) -> int:
    params = dict(model.named_parameters())
    return sum(int(masks[n].sum()) if masks and n in masks else params[n].numel() for n in names)


@contextlib.contextmanager
def _frozen_except(model: nn.Module, names: list[str]) -> Iterator[None]:
    """``requires_grad`` False on every parameter outside ``names`` (the caller restores the flags)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    yield


@torch.no_grad()
def _num_classes(model: nn.Module, forget: Any) -> int:
    for x, _ in batches_for(model, forget):
        if len(x):
            return _logits_width(model(x[:1]), type(model).__name__)
    raise ValueError("the forget set is empty: forget_dataloader() served no samples. Nothing to unlearn.")


def _logits_width(output: Any, model_name: str) -> int:
    """The number of classes from one forward's output, refusing anything but a (batch, classes) tensor."""
    if not isinstance(output, Tensor):
        what = f"a dict with keys {sorted(output)}" if isinstance(output, dict) else f"a {type(output).__name__}"
        raise TypeError(
            f"{model_name}.forward(x) returned {what}, but unlearning needs the logits as one tensor of shape "
            "(batch, classes). Return the logits from forward (keep other outputs in another method), or unlearn "
            "a wrapper module whose forward returns them."
        )
    if output.ndim != 2:
        raise ValueError(
            f"{model_name}.forward(x) returned a tensor of shape {tuple(output.shape)}, but unlearning is for "
            "classification and needs logits of shape (batch, classes)."
        )
    return int(output.shape[-1])


def _shows_progress(trainer: pl.Trainer) -> bool:
    """False when the trainer was built with ``enable_progress_bar=False``."""
    return getattr(trainer, "progress_bar_callback", None) is not None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device
