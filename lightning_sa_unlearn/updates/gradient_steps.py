"""Updates built from gradient steps: Warnecke et al.'s first order, forget-loss descent, fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor

from lightning_sa_unlearn.data import dataset_size, sized
from lightning_sa_unlearn.functional import batches_for
from lightning_sa_unlearn.objective.stored_features import FeatureCache, count_split_passes, split_below
from lightning_sa_unlearn.updates.base import (
    Objective,
    StepSize,
    Update,
    UpdateInputs,
    UpdateResult,
    ValidationSpec,
    step_size_from,
)
from lightning_sa_unlearn.updates.descent import OPTIMIZERS, fine_tune, forget_loss_descent
from lightning_sa_unlearn.updates.functional import _copy, _reset, default_tau_grid


class FirstOrder(Update):
    """Warnecke et al.'s closed form ``θ_S ← θ_S − τ·∇_S L_forget`` with eq. 7 in sum reduction.

    Args:
        step_size: a :class:`StepSize`; a number for a fixed τ; None for τ chosen on validation
            (:class:`ValidatedStep` over :func:`default_tau_grid`, 0 included).
    """

    name = "first_order"

    def __init__(self, step_size: StepSize | float | None = None) -> None:
        self.step_size = step_size_from(step_size)

    def validation(self) -> ValidationSpec | None:
        return self.step_size.validation()

    def apply(self, inputs: UpdateInputs) -> dict[str, Any]:
        grid = default_tau_grid(inputs.model, inputs.gradient, inputs.names)
        return self.step_size.apply(inputs, inputs.gradient, grid)

    def advice(self, result: UpdateResult) -> str:
        return self.step_size.advice()


class IteratedFirstOrder(Update):
    """Warnecke et al.'s closed form, repeated where one step stops short:
    ``θ_S^{k+1} = θ_S^k − τ_k·∇_S L_forget(θ^k)`` (eq. 7 in sum reduction, taken again at the new weights).

    Each τ_k is chosen on validation data by ``step_size`` (τ = 0 included), so the first step is
    :class:`FirstOrder`'s. The update stops at the first step whose search keeps τ = 0 (no step lowers the
    validation objective beyond noise) or after ``max_steps`` steps; never on the test set. The τ range of
    every search is the first gradient's (:func:`default_tau_grid`).

    Args:
        max_steps: the most steps (1: :class:`FirstOrder`).
        step_size: as :class:`FirstOrder`'s; a fixed τ takes ``max_steps`` steps of that size.
    """

    name = "iterated_first_order"

    def __init__(self, max_steps: int = 10, step_size: StepSize | float | None = None) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        self.max_steps, self.step_size = max_steps, step_size_from(step_size)

    def validation(self) -> ValidationSpec | None:
        return self.step_size.validation()

    def advice(self, result: UpdateResult) -> str:
        return f"Lower max_steps ({self.max_steps}), or: {self.step_size.advice()}"

    def apply(self, inputs: UpdateInputs) -> UpdateResult:
        run, gradient = inputs.run, inputs.gradient
        grid = default_tau_grid(inputs.model, gradient, inputs.names)
        steps: list[dict[str, Any]] = []
        for step in range(self.max_steps):
            if step:  # ∇L_forget at the new weights, through the selected parameters only
                gradient = run.forget_gradient()
            steps.append(self.step_size.apply(inputs, gradient, grid))
            if steps[-1]["tau"] == 0:
                break
        first, last = steps[0], steps[-1]
        taken = [s["tau"] for s in steps if s["tau"] > 0]
        return UpdateResult(
            tau=first["tau"],
            tau_search=first.get("tau_search", []),
            validation_samples=max((s.get("validation_samples") or 0 for s in steps), default=None) or None,
            objective_after=last.get("objective_after"),
            steps=len(taken),
            details={"taus": [s["tau"] for s in steps]},
        )


class ForgetLossDescent(Update):
    """``steps`` full-batch gradient steps of size ``lr`` on paper eq. 6 over ``θ_S``.

    ``J(θ) = L_forget / |D_f| + λ·L_{D'_r} / |D'_r|`` with λ = ``retain_weight`` and ``|D'_r|`` =
    ``retain_samples``; with a validation set the parameters end at the step (0 included) of least
    validation ``objective`` (early stopping that never makes validation worse).
    """

    name = "forget_loss"

    def __init__(
        self,
        steps: int = 10,
        lr: float = 0.01,
        retain_weight: float = 1.0,
        retain_samples: int | None = 2500,
        objective: Literal["validation", "validation_and_forget"] = "validation",
        validation_samples: int = 5000,
    ) -> None:
        if steps < 1 or not lr > 0 or retain_weight < 0:
            raise ValueError(
                f"ForgetLossDescent needs steps >= 1, lr > 0, retain_weight >= 0; got {steps}, {lr}, {retain_weight}."
            )
        if retain_samples is not None and retain_samples < 1:
            raise ValueError(f"retain_samples must be >= 1 or None (all), got {retain_samples}.")
        self.steps, self.lr, self.retain_weight, self.retain_samples = steps, lr, retain_weight, retain_samples
        self.spec = ValidationSpec(objective, validation_samples)

    def validation(self) -> ValidationSpec:
        return self.spec

    def advice(self, result: UpdateResult) -> str:
        return (
            f"Lower ForgetLossDescent's lr ({self.lr:g}) or steps ({self.steps}); with val_dataloader() it also "
            "stops at its best step."
        )

    def apply(self, inputs: UpdateInputs) -> dict[str, Any]:
        run, data = inputs.run, inputs.run.data
        steps = forget_loss_descent(
            inputs.model,
            inputs.names,
            run.batches(data.forget, "forget"),
            run.batches(data.corrected, "corrected"),
            run.batches(data.retain, "retain", self.retain_samples),
            steps=self.steps,
            lr=self.lr,
            retain_weight=self.retain_weight,
            forget_loss=run.forget_loss,
            loss_fn=run.loss_fn,
            masks=inputs.masks,
            all_reduce=run.processes.sum_tree,
            validation_loss=inputs.objective,
            progress=lambda it: run.progress(it, "forget-loss descent", self.steps),
        )
        return {"steps": steps}


class FineTune(Update):
    """Train ``θ_S`` on ``D_r ∪ D̃_f`` (or ``D_r`` alone) with SGD or Adam, in eval mode (BatchNorm frozen).

    Args:
        epochs, lr, momentum, weight_decay: the optimizer's settings. A list for ``lr``: one fine-tune per
            value from the same weights, each ended at its best epoch on validation (as ``best_epoch``), and the
            one of least validation objective kept; later trials reuse the first one's stored features. The
            report's ``update_details["lr_search"]`` gives each trial.
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        include_corrected: train on ``D_r ∪ D̃_f`` (True) or on ``D_r`` alone.
        retain_samples: train on a seeded random subset of this many retain samples (None: all of
            ``D_r``; loaders that are not map-style give their first samples); the report's
            ``update_details`` gives the count (None for loaders whose size is unknown).
        best_epoch: end at the epoch (0, the weights before, included) of least validation objective on
            ``validation_samples`` validation samples, measured after every epoch through the stored outputs
            of the layers below the selection (never the test set); ``epochs`` is then the most it trains.
            The report's ``update_details`` gives ``epoch_objectives`` and the ``best_epoch``. ``objective``
            as :class:`ValidationSpec`'s (``"validation_and_forget"`` adds D_f's inputs under D̃_f's labels,
            which sees a backdoor trigger).
        cache_features: where the model splits below the selection, run the
            frozen layers below it once per sample and train later epochs on their stored outputs
            (:mod:`~lightning_sa_unlearn.objective.stored_features`; up to 2 GiB of features). The same
            weights as without it for loaders that serve the same batches in every pass; the report's
            ``update_details["cached_below"]`` names the last cached module when the cache was used.
    """

    name = "fine_tune"
    needs_forget_gradient = False
    needs_retain = True

    def __init__(
        self,
        epochs: int = 1,
        lr: float | list[float] = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        include_corrected: bool = True,
        retain_samples: int | None = None,
        cache_features: bool = True,
        best_epoch: bool = False,
        validation_samples: int = 2048,
        objective: Objective = "validation",
    ) -> None:
        if retain_samples is not None and retain_samples < 1:
            raise ValueError(f"retain_samples must be >= 1 or None (all), got {retain_samples}.")
        lrs = [float(v) for v in lr] if isinstance(lr, (list, tuple)) else [lr]
        if not lrs or epochs < 1 or not all(v > 0 for v in lrs) or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                "FineTune needs epochs >= 1, lr > 0, 0 <= momentum < 1 and weight_decay >= 0; got "
                f"{epochs}, {lr}, {momentum}, {weight_decay}."
            )
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.optimizer, self.include_corrected = optimizer, include_corrected
        self.retain_samples, self.cache_features = retain_samples, cache_features
        if validation_samples < 1:
            raise ValueError(f"validation_samples must be >= 1, got {validation_samples}.")
        self.best_epoch, self.validation_samples = best_epoch, validation_samples
        self.spec, self.lrs = ValidationSpec(objective), lrs

    def validation(self) -> ValidationSpec | None:
        return self.spec if self.best_epoch or len(self.lrs) > 1 else None

    def advice(self, result: UpdateResult) -> str:
        return f"Lower FineTune's lr ({self.lr}) or epochs ({self.epochs})."

    def apply(self, inputs: UpdateInputs) -> dict[str, Any]:
        run = inputs.run
        processes, data = run.processes, run.data
        sources = [run.batches(data.retain, "retain", self.retain_samples, shuffle=True)]
        if data.corrected is not None and self.include_corrected:
            sources.append(run.batches(data.corrected, "corrected", shuffle=True))
        lengths = [sized(s) for s in sources]
        steps_per_epoch = None
        if processes.world_size > 1:
            if None in lengths:
                raise ValueError("FineTune under several processes needs sized dataloaders (map-style datasets).")
            steps_per_epoch = processes.min(sum(lengths))

        cached, below_path = self._cache(inputs, sources)
        params = dict(inputs.model.named_parameters())
        start = _copy(params, inputs.names)
        trials = []
        for lr in self.lrs:  # one trial per lr, each from the same weights
            _reset(params, start)
            tracker = _BestEpoch(inputs, self.validation_samples) if self.validation() else None
            try:
                steps = self._fine_tune(inputs, sources, lr, steps_per_epoch, cached, tracker)
            except FloatingPointError:
                if tracker is None or len(self.lrs) == 1:  # nothing measured to fall back on
                    raise
                # this lr diverged: the trial keeps its best epoch before that (epoch 0 at least); its steps are lost
                steps = 0
                tracker.diverged()
                if "cache" in cached:
                    cached["cache"].reset()
            found = tracker.finish() if tracker is not None else {}
            value = min((v for v in found.get("epoch_objectives", []) if math.isfinite(v)), default=math.inf)
            trials.append((value, lr, steps, found, _copy(params, inputs.names)))
        value, lr, steps, found, weights = min(trials, key=lambda trial: trial[0])  # ties: the first lr
        _reset(params, weights)
        used = "cache" in cached and cached["cache"].usable  # not when dropped at its limit, or left incomplete
        retain = _samples(data.retain, run.capped(self.retain_samples))
        details = {"retain_samples": retain, "cached_below": below_path if used else None, **found}
        if len(self.lrs) > 1:
            details["lr"] = lr
            details["lr_search"] = [
                {
                    "lr": t[1],
                    "objective": t[0],
                    "best_epoch": t[3]["best_epoch"],
                    "diverged": t[3].get("diverged", False),
                }
                for t in trials
            ]
        return {"steps": steps, "details": details}

    def _fine_tune(
        self,
        inputs: UpdateInputs,
        sources: list[Any],
        lr: float,
        steps_per_epoch: int | None,
        cached: dict[str, Any],
        tracker: _BestEpoch | None,
    ) -> int:
        run, processes = inputs.run, inputs.run.processes

        def average_gradients(params: Sequence[Tensor]) -> None:  # one all-reduce for all selected tensors
            summed = processes.sum_tree({str(i): p.grad for i, p in enumerate(params)})
            for i, p in enumerate(params):
                p.grad = summed[str(i)] / processes.world_size

        return fine_tune(
            inputs.model,
            inputs.names,
            sources,
            epochs=self.epochs,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            masks=inputs.masks,
            loss_fn=run.loss_fn,
            seed=run.seed + processes.rank,
            steps_per_epoch=steps_per_epoch,
            average_gradients=average_gradients if processes.world_size > 1 else None,
            progress=lambda it: run.progress(it, "fine-tuning", steps_per_epoch),
            after_epoch=tracker,
            **cached,
        )

    def _cache(self, inputs: UpdateInputs, sources: Sequence[Any]) -> tuple[dict[str, Any], str | None]:
        """``fine_tune``'s ``cache`` and ``above`` where the model allows it, and the last cached module's path."""
        if not self.cache_features or self.epochs < 2 and len(self.lrs) < 2:
            return {}, None
        probe = next((x for x, _ in batches_for(inputs.model, sources[0])), None)
        split = split_below(inputs.model, inputs.names, probe)
        if split is None:
            return {}, None
        below, above, path = split
        count_split_passes(below, above, inputs.run.count)
        return {"cache": FeatureCache(below, sources), "above": above}, path


def _samples(loader: Any, limit: int | None) -> int | None:
    """How many samples of a map-style ``loader`` a read capped at ``limit`` takes (None for other loaders)."""
    size = dataset_size(loader)
    return None if size is None else min(size, limit or size)


class _BestEpoch:
    """After each epoch: the validation objective, and a copy of the selected parameters while it is the least so
    far (epoch 0: the weights before fine-tuning). :meth:`finish` puts the best epoch's weights back."""

    def __init__(self, inputs: UpdateInputs, samples: int) -> None:
        if inputs.objective is None:
            raise ValueError(
                "FineTune(best_epoch=True) needs validation data: define val_dataloader() or retain_dataloader()."
            )
        self.inputs, self.samples = inputs, samples
        self.params = dict(inputs.model.named_parameters())
        self.objectives, self.failed = [self._objective()], False
        self.best = _copy(self.params, inputs.names)

    def _objective(self) -> float:
        inputs = self.inputs
        return inputs.objective.on_subset(inputs.model, inputs.names, self.samples, inputs.run.count)

    def __call__(self, epoch: int) -> None:
        value = self._objective()
        if value < min(self.objectives):  # NaN never wins
            self.best = _copy(self.params, self.inputs.names)
        self.objectives.append(value)

    def diverged(self) -> None:
        """The epoch under way ended with a non-finite loss: it counts as an infinite objective."""
        self.objectives.append(math.inf)
        self.failed = True

    def finish(self) -> dict[str, Any]:
        _reset(self.params, self.best)
        finite = [v if math.isfinite(v) else math.inf for v in self.objectives]
        found = {"epoch_objectives": self.objectives, "best_epoch": finite.index(min(finite))}
        return {**found, "diverged": True} if self.failed else found
