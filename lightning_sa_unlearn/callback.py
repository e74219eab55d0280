"""The Lightning callback: sharpness-aware unlearning at the end of ``fit``, or on demand."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_sa_unlearn.confidence import SharpnessStatistics, selection_margin
from lightning_sa_unlearn.curvature import CURVATURE_METHODS, hessian_diagonal_sum
from lightning_sa_unlearn.data import UnlearningData, checked_labels, is_map_style, shard, sized
from lightning_sa_unlearn.evaluation import ClassificationMetrics
from lightning_sa_unlearn.functional import (
    batches_for,
    eval_mode,
    require_trainable_parameters,
    split_batch,
    trainable_parameters,
)
from lightning_sa_unlearn.membership import membership_inference
from lightning_sa_unlearn.relearn import relearn_evaluation
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.second_order import (
    SOLVERS,
    conjugate_gradient,
    damped,
    hessian_vector_product,
    largest_eigenvalue,
    lissa,
    project,
)
from lightning_sa_unlearn.selection import (
    SELECTION_RULES,
    entry_decrement,
    layer_sharpness,
    newton_decrement,
    select_layers,
    top_fraction,
    trainable_layers,
)
from lightning_sa_unlearn.updates import (
    OPTIMIZERS,
    apply_first_order,
    choose_tau,
    default_forget_loss,
    default_tau_grid,
    fine_tune,
    forget_gradient,
    forget_loss_descent,
    loss_sum,
)

UPDATES = ("first_order", "second_order", "forget_loss", "fine_tune")
EVALUATIONS = ("mia", "relearn")
_FAST_DEV_RUN_SAMPLES = 64
SECOND_ORDER_TAUS = [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
"""Step sizes along the Newton direction tried by ``update="second_order", tau="auto"`` (1 is eq. 12)."""


class SharpnessAwareUnlearning(Callback):
    r"""Remove the effect of wrong training data by updating only the layers chosen by curvature.

    At the end of ``trainer.fit`` (or through :meth:`unlearn` on a fitted model) it:

    1. measures ``diag H_learn(θ*)`` on ``train_dataloader()`` (:func:`hessian_diagonal`);
    2. averages it per layer (:func:`layer_sharpness`) and picks layers (:meth:`select_layers`);
    3. freezes every other parameter;
    4. updates the picked layers: ``"first_order"`` is Warnecke et al.'s
       ``θ_S ← θ_S − τ·∇_S L_forget`` with ``L_forget`` the paper's eq. 7 in sum reduction
       (:meth:`forget_loss`); ``"second_order"`` is eq. 12, ``θ_S ← θ_S − (H_SS + λI)⁻¹ ∇_S L_forget``;
       ``"forget_loss"`` descends eq. 6; ``"fine_tune"`` trains ``θ_S`` on ``D_r ∪ D̃_f``;
    5. reports held-out and forget-set metrics before and after (:attr:`report`).

    Only the selected parameters change; every other tensor, BatchNorm buffers included, stays
    bitwise identical. ``requires_grad`` flags and train/eval modes are restored. If anything
    fails midway, the weights are restored before the error is raised.

    Args:
        update: ``"first_order"``, ``"second_order"``, ``"forget_loss"`` or ``"fine_tune"``.
        selection: ``"flattest"`` (smallest mean diagonal; paper section 4.1 and Figure 1),
            ``"sharpest"`` (largest; the abstract and section 5.1), ``"last"`` (Warnecke et al.'s
            baseline), ``"all"``, ``"newton_decrement"`` (largest ``Σ g²/(H_ii + λ)`` per
            parameter, :func:`~lightning_sa_unlearn.selection.newton_decrement`), or module paths.
        num_layers: how many layers a rule picks.
        granularity: ``"layer"``, or ``"parameter"``: the ``fraction`` of single entries, model-wide,
            that the rule ranks first; masked-out entries stay bitwise identical.
        fraction: the share of entries updated with ``granularity="parameter"``, in (0, 1].
        curvature: a :func:`hessian_diagonal` method; ``"ggn"`` equals the Hessian diagonal for
            ReLU/max-pool networks.
        curvature_samples: at most this many training samples for curvature (None: all).
        num_probes: probes for ``curvature="hutchinson"``.
        num_samples: sampled labels per example for ``curvature="mc_ggn"``.
            The defaults (10,000 samples, 10 probes, 1 sample) come from
            ``benchmarks/results/curvature_seeds.md``: on MNIST every method picked the same layer
            in 5 of 5 seeds, ``ggn`` on 10,000 samples with a lead of 20 standard errors in a fifth
            of the time of all 50,000. The report's ``selection_margin`` checks this on your data.
        tau: the first-order step size, or ``"auto"``: the τ of least validation loss on a log
            grid that includes 0 (no update). Validation is ``val_dataloader()`` or, without one,
            the first ``validation_samples`` of the retain set; never the test set. For
            ``second_order``, τ scales the solved step: ``tau=1.0`` is eq. 12 exactly, ``"auto"``
            searches :data:`SECOND_ORDER_TAUS` (0 and 1 included) on validation. ``forget_loss``
            keeps the step count (0 included) of least validation loss.
        tau_grid: the τ values tried by ``"auto"`` (default: :func:`default_tau_grid`).
        tau_objective: what ``"auto"`` (and the step count of ``forget_loss``) minimises:
            ``"validation"``, the mean validation loss; or ``"validation_and_forget"``, that plus
            the mean loss of the forget inputs under their corrected labels (``D_f``'s inputs,
            ``D̃_f``'s labels). Clean validation data cannot see a backdoor trigger; the second
            objective can, because the triggered inputs must regain their true labels.
        validation_samples: size of the retain slice used when there is no validation set.
        damping: λ in ``H + λI`` (``second_order``, ``newton_decrement``).
        solver: ``"cg"`` (conjugate gradient) or ``"lissa"`` for ``second_order``, with
            ``max_iterations`` and ``tolerance`` (relative residual); ``lissa_scale`` (default: from a
            power iteration) must exceed the largest eigenvalue of ``H + λI``.
        fallback: ``"first_order"`` applies the first-order update when the solve fails, and the
            report says so; None raises (after restoring the weights).
        steps, retain_weight, retain_samples: ``forget_loss`` runs ``steps`` gradient steps of size
            ``lr`` on eq. 6 with λ = ``retain_weight`` and ``|D'_r|`` = ``retain_samples``.
        epochs, lr, momentum, weight_decay, optimizer: ``fine_tune``'s optimizer (``"sgd"`` or
            ``"adam"``); ``lr`` is also the step size of ``forget_loss``.
        include_corrected: ``fine_tune`` on ``D_r ∪ D̃_f`` (True) or on ``D_r`` alone.
        loss_fn: the training loss, ``loss_fn(logits, y)`` with mean reduction.
        seed: seeds all randomness of the run (the caller's global RNG state is left as it was).
        report_path, plot_path: where rank 0 writes the JSON report and the sharpness plot.
        progress_bar: show progress on steps that take more than a couple of seconds.
        verbose: print the before/after table when done.
        unlearn_on_train_end: unlearn at the end of ``trainer.fit`` (set False to only train, and
            unlearn later with :meth:`unlearn` or ``sa-unlearn unlearn``).
        checkpoint_path: save the unlearned model there (a Lightning checkpoint that
            ``load_from_checkpoint`` reads). ``ModelCheckpoint`` files written during training
            hold the model from before unlearning.
        evaluate: extra checks, in the report: ``"mia"`` runs membership inference on ``D_f``
            before and after (:func:`~lightning_sa_unlearn.membership.membership_inference`, on at
            most ``mia_samples`` retain and test samples); ``"relearn"`` runs the relearning attack
            on a copy of the unlearned model (:func:`~lightning_sa_unlearn.relearn.relearn_attack`:
            ``relearn_steps`` SGD steps of size ``relearn_lr`` on the first ``relearn_samples``
            forget samples) and measures it. Pick ``relearn_lr`` so that a model retrained without
            ``D_f`` is not taught it from scratch by the attack. A ``triggered_test_dataloader()`` adds the backdoor's
            attack success rate to the held-out metrics.
    """

    def __init__(
        self,
        update: Literal["first_order", "second_order", "forget_loss", "fine_tune"] = "first_order",
        selection: Literal["flattest", "sharpest", "last", "all", "newton_decrement"] | list[str] = "flattest",
        num_layers: int = 1,
        granularity: Literal["layer", "parameter"] = "layer",
        fraction: float | None = None,
        curvature: Literal["ggn", "mc_ggn", "exact", "hutchinson", "empirical_fisher"] = "ggn",
        curvature_samples: int | None = 10_000,
        num_probes: int = 10,
        num_samples: int = 1,
        tau: float | Literal["auto"] = "auto",
        tau_grid: list[float] | None = None,
        tau_objective: Literal["validation", "validation_and_forget"] = "validation",
        validation_samples: int = 5000,
        damping: float = 1e-3,
        solver: Literal["cg", "lissa"] = "cg",
        max_iterations: int = 100,
        tolerance: float = 1e-6,
        lissa_scale: float | None = None,
        fallback: Literal["first_order"] | None = None,
        steps: int = 10,
        retain_weight: float = 1.0,
        retain_samples: int | None = 2500,
        epochs: int = 1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        include_corrected: bool = True,
        loss_fn: Callable[..., Any] = F.cross_entropy,
        seed: int = 0,
        report_path: str | None = None,
        plot_path: str | None = None,
        progress_bar: bool = True,
        verbose: bool = True,
        unlearn_on_train_end: bool = True,
        checkpoint_path: str | None = None,
        evaluate: Sequence[Literal["mia", "relearn"]] = (),
        mia_samples: int = 5000,
        relearn_samples: int = 50,
        relearn_steps: int = 10,
        relearn_lr: float = 1e-4,
    ) -> None:
        _check_arguments(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.update = update
        self.selection = selection if isinstance(selection, str) else list(selection)
        self.num_layers, self.granularity, self.fraction = num_layers, granularity, fraction
        self.curvature, self.curvature_samples, self.num_probes = curvature, curvature_samples, num_probes
        self.num_samples = num_samples
        self.tau, self.tau_grid, self.validation_samples = tau, tau_grid, validation_samples
        self.tau_objective = tau_objective
        self.damping, self.solver, self.max_iterations, self.tolerance = damping, solver, max_iterations, tolerance
        self.lissa_scale, self.fallback = lissa_scale, fallback
        self.steps, self.retain_weight, self.retain_samples = steps, retain_weight, retain_samples
        self.epochs, self.lr, self.momentum = epochs, lr, momentum
        self.weight_decay, self.optimizer = weight_decay, optimizer
        self.include_corrected = include_corrected
        self.loss_fn = loss_fn
        self.seed = seed
        self.report_path, self.plot_path = report_path, plot_path
        self.progress_bar, self.verbose = progress_bar, verbose
        self.unlearn_on_train_end = unlearn_on_train_end
        self.checkpoint_path = checkpoint_path
        self.evaluate = list(evaluate)
        self.mia_samples, self.relearn_samples = mia_samples, relearn_samples
        self.relearn_steps, self.relearn_lr = relearn_steps, relearn_lr
        self.report: UnlearningReport | None = None
        self.unlearn_on_validation_end = False  # set by `sa-unlearn unlearn`
        self._decrement: dict[str, float] | None = None  # newton_decrement scores of the current run

    # ------------------------------------------------------------------ override points
    def forget_loss(
        self, pl_module: nn.Module, forget_batch: tuple[Tensor, Tensor], corrected_batch: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """The loss whose gradient drives the update, on one pair of aligned batches.

        Default: paper eq. 7 with sum reduction, ``Σ_{D̃_f} ℓ − Σ_{D_f} ℓ``. ``corrected_batch``
        is None for sample unlearning (then the default is gradient ascent on ``D_f``).
        Batches arrive on the model's device. Override for a custom forget objective.
        """
        return default_forget_loss(pl_module, forget_batch, corrected_batch, self.loss_fn)

    def select_layers(self, sharpness: dict[str, float]) -> list[str]:
        """Module paths to update, given ``{module path: mean Hessian diagonal}`` in registration order.

        Default: :func:`~lightning_sa_unlearn.selection.select_layers` with ``selection`` and
        ``num_layers`` (``"newton_decrement"`` ranks this run's decrement scores instead of the
        sharpness). Override for a rule of your own; return names from ``sharpness``.
        """
        if self.selection == "newton_decrement":
            return select_layers(self._decrement, "newton_decrement", self.num_layers)
        return select_layers(sharpness, self.selection, self.num_layers)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise RuntimeError(
                f"SharpnessAwareUnlearning does not support {type(trainer.strategy).__name__}, which shards "
                "parameters. Use a single device or strategy='ddp' / 'ddp_spawn'."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unlearn_on_train_end:
            self.run(trainer, pl_module, _ready(trainer.datamodule, "test"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``sa-unlearn unlearn`` path: unlearn inside ``trainer.validate``, in every process."""
        if self.unlearn_on_validation_end and not trainer.sanity_checking and not trainer.training:
            self.run(trainer, pl_module, _ready(trainer.datamodule, "fit", "test"))

    # ------------------------------------------------------------------ entry points
    def unlearn(
        self, model: pl.LightningModule, datamodule: Any = None, trainer: pl.Trainer | None = None
    ) -> UnlearningReport:
        """Unlearn on an already fitted ``model`` without training; returns the report.

        A LightningDataModule gets ``prepare_data()`` and ``setup("fit")``/``setup("test")``
        first. Without a ``trainer``, a minimal one (no logger, no checkpoints) is built.
        """
        if trainer is None:
            trainer = quiet_trainer(accelerator="cpu" if _device(model).type == "cpu" else "auto")
        if isinstance(datamodule, pl.LightningDataModule):
            datamodule.prepare_data()
        return self.run(trainer, model, _ready(datamodule, "fit", "test"))

    def run(self, trainer: pl.Trainer, pl_module: nn.Module, datamodule: Any = None) -> UnlearningReport:
        """Unlearn on ``pl_module`` with the data of ``datamodule`` (then ``pl_module``).

        Publishing the report and saving ``checkpoint_path`` are part of the run: if either fails,
        the weights are restored too.
        """
        self.report = None
        snapshot = {name: t.detach().clone() for name, t in _tensors(pl_module)}
        flags = {name: p.requires_grad for name, p in pl_module.named_parameters()}
        try:
            with torch.inference_mode(False), torch.enable_grad(), _seeded(self.seed), eval_mode(pl_module):
                report = self._unlearn(trainer, pl_module, datamodule)
            for name, p in pl_module.named_parameters():
                p.requires_grad_(flags[name])
            processes = _Processes(trainer, _device(pl_module))
            if self.checkpoint_path:  # saved before anything reports success
                processes.agree(lambda: _save_checkpoint(trainer, pl_module, self.checkpoint_path))
            processes.agree(lambda: self._publish(trainer, report))  # rank 0's file writes fail on every rank
        except BaseException:
            _restore(pl_module, snapshot)
            raise
        finally:
            for name, p in pl_module.named_parameters():
                p.requires_grad_(flags[name])
        self.report = report
        return report

    # ------------------------------------------------------------------ the work
    def _unlearn(self, trainer: pl.Trainer, model: nn.Module, datamodule: Any) -> UnlearningReport:
        seconds: dict[str, float] = {}
        total_start = time.perf_counter()
        processes = _Processes(trainer, _device(model))
        require_trainable_parameters(model)
        data = UnlearningData.resolve(datamodule, model)
        if self.update == "fine_tune" and data.retain is None:
            raise ValueError(
                "update='fine_tune' needs the retain set: define retain_dataloader() on your datamodule "
                "or LightningModule, or use update='first_order'."
            )
        _check_aligned(data.forget, data.corrected)
        target_class = getattr(datamodule, "target_class", None)
        if data.triggered_test is not None and target_class is None:
            raise ValueError(
                "triggered_test_dataloader() is defined but the datamodule has no target_class; set "
                "datamodule.target_class to the backdoor's target so that the attack success rate can be measured."
            )
        if self.tau_objective == "validation_and_forget" and data.corrected is None:
            raise ValueError(
                "tau_objective='validation_and_forget' scores the forget inputs with their corrected labels, "
                "so it needs corrected_dataloader(); use tau_objective='validation' for sample unlearning."
            )
        if "mia" in self.evaluate and (data.retain is None or data.test is None):
            raise ValueError(
                "evaluate=['mia'] needs retain_dataloader() (members) and test_dataloader() (non-members)."
            )
        if data.test is None:
            rank_zero_warn("no test_dataloader(): the report will have no held-out metrics.")
        layers = trainable_layers(model)
        if not isinstance(self.selection, str) or self.selection in ("flattest", "sharpest", "last"):
            select_layers(dict.fromkeys(layers, 0.0), self.selection, self.num_layers)  # fail before any work
        num_classes = _num_classes(model, data.forget)
        cap = _FAST_DEV_RUN_SAMPLES if trainer.fast_dev_run else None

        def batches(loader: Any, what: str, max_samples: int | None = None, **kwargs: Any) -> _Batches | None:
            if loader is None:
                return None
            limit = _min_or_none(max_samples, cap)
            kwargs.setdefault("rank", processes.rank)
            kwargs.setdefault("world_size", processes.world_size)
            return _Batches(loader, num_classes, what, max_samples=limit, seed=self.seed, **kwargs)

        forget, corrected = batches(data.forget, "forget"), batches(data.corrected, "corrected")
        test, triggered = batches(data.test, "test"), batches(data.triggered_test, "triggered test")
        evaluation = (trainer, processes, model, num_classes, target_class, test, triggered, forget, corrected)
        with _stage(seconds, "evaluation"):
            heldout_before, forget_before = self._evaluate(*evaluation)

        def whole(loader: Any, what: str) -> _Batches | None:  # every process reads all of it: no collectives
            return batches(loader, what, rank=0, world_size=1)

        mia_data = None
        if "mia" in self.evaluate:
            mia_data = (whole(data.retain, "retain"), whole(data.test, "test"), whole(data.forget, "forget"))
            with _stage(seconds, "membership_inference"):
                mia_before = processes.agree(lambda: self._membership_inference(model, mia_data))

        with _stage(seconds, "forget_gradient"):
            local = processes.agree(
                lambda: forget_gradient(
                    model, forget, corrected, forget_loss=lambda m, f, c: self.forget_loss(m, f, c), allow_empty=True
                )
            )
            gradient = processes.sum_tree(local)
            bad = [name for name, g in gradient.items() if not torch.isfinite(g).all()]
            if bad:
                raise RuntimeError(
                    f"the forget gradient of {bad} is not finite; check forget_loss and the "
                    "forget/corrected data. Weights were left unchanged."
                )

        with _stage(seconds, "curvature"):
            diag, curvature_samples, statistics = self._curvature(trainer, processes, model, data, batches)

        training_size = _dataset_size(data.train) or curvature_samples
        with _stage(seconds, "selection"):
            sharpness = layer_sharpness(model, diag)
            # H of the SUM loss (eq. 2), estimated from the curvature samples
            diag_sum = {name: d * training_size for name, d in diag.items()}
            self._decrement = newton_decrement(model, gradient, diag_sum, self.damping)
            selected, names, masks = self._select(processes, model, layers, sharpness, gradient, diag, diag_sum)
            margin = None
            if self.granularity == "layer":
                margin = selection_margin(sharpness, statistics, selected, self.selection)
            if margin is not None and margin["lead_in_standard_errors"] < 2:  # NaN (one batch): no estimate
                rank_zero_warn(
                    f"the selected layer {margin['selected']!r} leads the runner-up {margin['runner_up']!r} by "
                    f"{margin['lead']:.3g}, only {margin['lead_in_standard_errors']:.2f} standard errors of the "
                    f"curvature estimate ({self.curvature}, {curvature_samples} samples): another sample could "
                    "select the other layer. Raise curvature_samples (or num_probes / num_samples)."
                )

        if data.val is not None:
            validation, validation_source = batches(data.val, "validation"), "val_dataloader"
        elif data.retain is not None:
            validation = batches(data.retain, "retain", self.validation_samples)
            validation_source = "retain slice"
        else:
            validation, validation_source = None, None

        relabelled = None
        if self.tau_objective == "validation_and_forget":
            if self.tau != "auto" or self.update == "fine_tune" or validation is None:
                rank_zero_warn(
                    "tau_objective='validation_and_forget' has no effect here: it only steers tau='auto' "
                    "and forget_loss's step count, and needs a validation set."
                )
            else:
                relabelled = _Relabelled(forget, corrected)
                validation_source = f"{validation_source} + forget inputs with corrected labels"

        def mean_loss(m: nn.Module, batches_: Iterable[Any] | None) -> float:
            total, count = processes.agree(lambda: loss_sum(m, batches_, self.loss_fn))
            total, count = processes.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
            return total / count if count else float("nan")

        def validation_loss(m: nn.Module, batches_: Iterable[Any] | None = validation) -> float:
            loss = mean_loss(m, batches_)
            if relabelled is not None and batches_ is validation:
                loss += mean_loss(m, relabelled)
            return loss

        with _stage(seconds, "update"), _frozen_except(model, names):
            step = _Step(
                trainer,
                processes,
                model,
                names,
                masks,
                gradient,
                data,
                batches,
                validation,
                validation_loss,
                hvp_scale=training_size / max(curvature_samples, 1),
            )
            outcome = self._update(step)
            after = validation_loss(model, validation if validation is not None else forget)
            params = dict(model.named_parameters())
            if not all(torch.isfinite(params[n]).all() for n in names) or not math.isfinite(after):
                raise RuntimeError(
                    f"the update made the model non-finite (loss {after}); the weights were restored. "
                    "Lower tau, lr or steps, raise damping, or check the forget loss."
                )

        with _stage(seconds, "evaluation"):
            heldout_after, forget_after = self._evaluate(*evaluation)
        extras: dict[str, Any] = {}
        if mia_data is not None:
            with _stage(seconds, "membership_inference"):
                mia_after = processes.agree(lambda: self._membership_inference(model, mia_data))
            extras["membership_inference"] = {"before": mia_before, "after": mia_after}
        if "relearn" in self.evaluate:
            with _stage(seconds, "relearn_attack"):
                extras["relearn"] = processes.agree(
                    lambda: relearn_evaluation(
                        model,
                        whole(data.forget, "forget"),
                        whole(data.test, "test"),
                        whole(data.triggered_test, "triggered test"),
                        num_classes=num_classes,
                        target_class=target_class,
                        samples=self.relearn_samples,
                        steps=self.relearn_steps,
                        lr=self.relearn_lr,
                        loss_fn=self.loss_fn,
                        seed=self.seed,
                    )
                )
        seconds["total"] = time.perf_counter() - total_start
        uses_validation = outcome.get("tau_search") or self.update == "forget_loss"
        return UnlearningReport(
            layer_sharpness=sharpness,
            selected_layers=selected,
            num_updated_parameters=_count_updated(model, names, masks),
            tau=outcome.get("tau"),
            heldout_before=heldout_before,
            heldout_after=heldout_after,
            forget_before=forget_before,
            forget_after=forget_after,
            seconds=seconds,
            update=self.update,
            selection=self.selection,
            curvature=self.curvature,
            curvature_samples=curvature_samples,
            tau_search=outcome.get("tau_search", []),
            validation_source=validation_source if uses_validation else None,
            fine_tune_steps=outcome.get("steps"),
            granularity=self.granularity,
            newton_decrement=dict(self._decrement),
            sharpness_standard_error=statistics.standard_errors(),
            selection_margin=margin,
            solver=outcome.get("solver"),
            fallback=outcome.get("fallback"),
            **extras,
        )

    def _select(self, processes, model, layers, sharpness, gradient, diag, diag_sum):
        """Selected layers, the parameter names they own, and entry masks (``granularity="parameter"``)."""
        if self.granularity == "parameter":
            if self.selection == "newton_decrement":
                masks = top_fraction(entry_decrement(gradient, diag_sum, self.damping), self.fraction, largest=True)
            else:
                masks = top_fraction(diag, self.fraction, largest=self.selection == "sharpest")
            selected = [layer for layer, owned in layers.items() if any(n in masks for n in owned)]
            return selected, [n for layer in selected for n in layers[layer] if n in masks], masks
        selected = processes.broadcast(processes.agree(lambda: list(self.select_layers(sharpness))))
        unknown = [name for name in selected if name not in layers]
        if not selected or unknown or len(set(selected)) != len(selected):
            raise ValueError(
                f"select_layers returned {selected}, which must be a non-empty list of distinct names "
                f"from {list(layers)}."
            )
        return selected, [name for layer in selected for name in layers[layer]], None

    def _update(self, step: _Step) -> dict[str, Any]:
        """Apply ``self.update`` to the selected parameters; returns what the report records."""
        if self.update == "first_order":
            return self._first_order(step)
        if self.update == "second_order":
            return self._second_order(step)
        if self.update == "forget_loss":
            data, batches = step.data, step.batches
            steps = forget_loss_descent(
                step.model,
                step.names,
                batches(data.forget, "forget"),
                batches(data.corrected, "corrected"),
                batches(data.retain, "retain", self.retain_samples),
                steps=self.steps,
                lr=self.lr,
                retain_weight=self.retain_weight,
                forget_loss=lambda m, f, c: self.forget_loss(m, f, c),
                loss_fn=self.loss_fn,
                masks=step.masks,
                all_reduce=step.processes.sum_tree,
                validation_loss=step.validation_loss if step.validation is not None else None,
                progress=lambda it: self._progress(step.trainer, it, "forget-loss descent", self.steps),
            )
            return {"steps": steps}
        return {"steps": self._fine_tune(step)}

    def _step_size(self, step: _Step, direction: dict[str, Tensor], default_grid: list[float]) -> dict[str, Any]:
        """``θ_S ← θ_S − τ·direction``: the fixed ``tau``, or the τ of least validation loss on a grid with 0."""
        if self.tau != "auto":
            apply_first_order(step.model, direction, step.names, float(self.tau), step.masks)
            return {"tau": float(self.tau)}
        if step.validation is None:
            raise ValueError(
                "tau='auto' needs a validation set: define val_dataloader() or retain_dataloader(), "
                "or pass a fixed tau."
            )
        grid = self.tau_grid or default_grid
        tau, losses = choose_tau(
            step.model,
            direction,
            step.names,
            grid,
            step.validation_loss,
            progress=lambda it: self._progress(step.trainer, it, "choosing tau", len(grid)),
            masks=step.masks,
        )
        return {"tau": tau, "tau_search": sorted(losses.items())}

    def _first_order(self, step: _Step) -> dict[str, Any]:
        """Warnecke et al.: ``θ_S ← θ_S − τ·∇_S L_forget``."""
        return self._step_size(step, step.gradient, default_tau_grid(step.model, step.gradient, step.names))

    def _second_order(self, step: _Step) -> dict[str, Any]:
        """Paper eq. 12 on S: ``θ_S ← θ_S − τ·(H_SS + λI)⁻¹ g_S`` with H of the SUM training loss (τ = 1: eq. 12)."""
        product = hessian_vector_product(
            step.model,
            step.batches(step.data.train, "training", self.curvature_samples),
            list(step.names),
            loss_fn=self.loss_fn,
            scale=step.hvp_scale,
            masks=step.masks,
            all_reduce=step.processes.sum_tree,
        )
        matvec = damped(product, self.damping)
        b = project({name: step.gradient[name] for name in step.names}, step.masks)
        iterations = iter(
            self._progress(step.trainer, range(self.max_iterations), f"second order ({self.solver})", None)
        )

        def counted(v):  # advances the progress display once per Hessian-vector product
            next(iterations, None)
            return matvec(v)

        if self.solver == "cg":
            result = conjugate_gradient(counted, b, max_iterations=self.max_iterations, tolerance=self.tolerance)
            scale = None
        else:
            scale = self.lissa_scale or 1.1 * largest_eigenvalue(matvec, b, seed=self.seed)
            result = lissa(counted, b, scale=scale, max_iterations=self.max_iterations, tolerance=self.tolerance)
        solver = {
            "name": self.solver,
            "iterations": result.iterations,
            "relative_residual": result.residual,
            "status": result.reason,
            "damping": self.damping,
            "hvp_scale": step.hvp_scale,
            "lissa_scale": scale,
        }
        if result.ok:
            return {**self._step_size(step, result.x, SECOND_ORDER_TAUS), "solver": solver}
        message = (
            f"the {self.solver} solve failed ({result.reason}, relative residual {result.residual:.3g} "
            f"after {result.iterations} iterations)"
        )
        if self.fallback != "first_order":
            raise RuntimeError(
                f"{message}; the weights were restored. Raise damping or max_iterations, use "
                "solver='cg', or pass fallback='first_order'."
            )
        rank_zero_warn(f"{message}; applying the first-order update instead (fallback='first_order').")
        return {**self._first_order(step), "solver": solver, "fallback": f"{message}; applied first_order instead"}

    def _curvature(self, trainer, processes: _Processes, model: nn.Module, data: UnlearningData, batches):
        """Per-process sums on disjoint shards, all-reduced; Hutchinson splits probes instead of data.

        With ``"hutchinson"`` every process reads the whole curvature sample with probes of its own
        seed, and the estimates are averaged: more processes, more probes, less variance.
        """
        probe_parallel = self.curvature == "hutchinson"
        shard = dict(rank=0, world_size=1) if probe_parallel else {}
        train = batches(data.train, "training", self.curvature_samples, **shard)
        generator = torch.Generator(device=_device(model)).manual_seed(self.seed + 7919 * processes.rank)
        progress = self._progress(trainer, train, f"curvature ({self.curvature})", sized(train))
        statistics = SharpnessStatistics(model)
        # probe-parallel: every process reads the same batches, so a batch's estimates are averaged over the
        # processes and recorded once (recording each copy would count correlated replicates as independent)
        per_batch: list[tuple[Tensor, int]] = []
        parallel_probes = probe_parallel and processes.world_size > 1

        def on_batch(part: dict[str, Tensor], size: int) -> None:
            if parallel_probes:
                per_batch.append((statistics.layer_sums(part), size))
            else:
                statistics.update(part, size)

        local, count = processes.agree(
            lambda: hessian_diagonal_sum(
                model,
                progress,
                loss_fn=self.loss_fn,
                method=self.curvature,
                num_probes=self.num_probes,
                num_samples=self.num_samples,
                generator=generator,
                on_batch=on_batch,
            )
        )
        if parallel_probes:
            sums = torch.stack([y for y, _ in per_batch]) if per_batch else torch.zeros(0, len(statistics.names))
            averaged = processes.sum(sums.to(torch.float64)).cpu() / processes.world_size
            for y, (_, size) in zip(averaged, per_batch):
                statistics.record(y, size)
        else:
            statistics.state = {k: v.cpu() for k, v in processes.sum_tree(statistics.state).items()}
        if local is None:
            local = {name: torch.zeros_like(p) for name, p in trainable_parameters(model).items()}
        total = processes.sum_tree(local)
        count = int(processes.sum(torch.tensor(float(count), dtype=torch.float64)))
        copies = processes.world_size if probe_parallel else 1
        if count == 0:
            raise ValueError("the training set is empty: train_dataloader() served no samples for the curvature.")
        diag = {name: value / count for name, value in total.items()}  # count already holds every copy
        bad = [name for name, d in diag.items() if not torch.isfinite(d).all()]
        if bad:
            raise RuntimeError(
                f"the curvature of {bad} is not finite; the model's weights or data may "
                "hold NaN/inf. Weights were left unchanged."
            )
        return diag, count // copies, statistics

    def _fine_tune(self, step: _Step) -> int:
        trainer, processes, data, batches = step.trainer, step.processes, step.data, step.batches
        sources = [batches(data.retain, "retain", shuffle=True)]
        if data.corrected is not None and self.include_corrected:
            sources.append(batches(data.corrected, "corrected", shuffle=True))
        lengths = [sized(s) for s in sources]
        steps_per_epoch = None
        if processes.world_size > 1:
            if None in lengths:
                raise ValueError("fine_tune under several processes needs sized dataloaders (map-style datasets).")
            steps_per_epoch = processes.min(sum(lengths))

        def average_gradients(params: Sequence[Tensor]) -> None:  # one all-reduce for all selected tensors
            summed = processes.sum_tree({str(i): p.grad for i, p in enumerate(params)})
            for i, p in enumerate(params):
                p.grad = summed[str(i)] / processes.world_size

        return fine_tune(
            step.model,
            step.names,
            sources,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            masks=step.masks,
            loss_fn=self.loss_fn,
            seed=self.seed + processes.rank,
            steps_per_epoch=steps_per_epoch,
            average_gradients=average_gradients if processes.world_size > 1 else None,
            progress=lambda it: self._progress(trainer, it, "fine-tuning", steps_per_epoch),
        )

    def _evaluate(self, trainer, processes, model, num_classes, target_class, test, triggered, forget, corrected):
        metrics = {"forget": (ClassificationMetrics(num_classes, loss_fn=self.loss_fn), forget)}
        if corrected is not None:
            metrics["corrected"] = (ClassificationMetrics(num_classes, loss_fn=self.loss_fn), corrected)
        if test is not None:
            held_out = ClassificationMetrics(num_classes, target_class, loss_fn=self.loss_fn)
            metrics["test"] = (held_out, test)
        if triggered is not None:
            metrics["triggered"] = (ClassificationMetrics(num_classes, target_class, loss_fn=self.loss_fn), triggered)

        def update() -> None:
            for name, (metric, loader) in metrics.items():
                description = "held-out metrics" if name == "test" else f"{name} metrics"
                metric.update_from(model, loader, lambda it: self._progress(trainer, it, description, sized(loader)))

        processes.agree(update)
        values = {name: metric.compute() for name, (metric, _) in metrics.items()}  # syncs across processes
        heldout = values.get("test", {})
        if "triggered" in values:
            heldout["attack_success_rate"] = values["triggered"]["predicted_as_target"]
        forget_metrics = {"accuracy_trained_labels": values["forget"]["accuracy"]}
        if "corrected" in values:
            forget_metrics["accuracy_corrected_labels"] = values["corrected"]["accuracy"]
        return heldout, forget_metrics

    def _membership_inference(self, model: nn.Module, data: tuple[Any, Any, Any]) -> dict[str, float]:
        retain, test, forget = data
        return membership_inference(model, retain, test, forget, max_samples=self.mia_samples, seed=self.seed)

    def _progress(self, trainer: pl.Trainer, iterable: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
        enabled = self.progress_bar and trainer.is_global_zero
        return tqdm(iterable, desc=desc, total=total, leave=False, delay=2.0, disable=not enabled, dynamic_ncols=True)

    def _publish(self, trainer: pl.Trainer, report: UnlearningReport) -> None:
        metrics = report.scalar_metrics()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if not trainer.is_global_zero:
            return
        if self.report_path:
            report.to_json(self.report_path)
        if self.plot_path:
            report.plot(self.plot_path)
        if self.verbose:
            rank_zero_info("\nSharpness-aware unlearning\n" + report.format_table())


# ---------------------------------------------------------------------- helpers
def quiet_trainer(**options: Any) -> pl.Trainer:
    """A one-device Trainer that writes nothing: no logger, checkpoints, summary, progress bar or sanity check.

    ``options`` override or add Trainer arguments (e.g. ``max_epochs``, ``precision``, ``callbacks``).
    """
    defaults = dict(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **options})


@dataclass
class _Step:
    """What every update needs: the selected parameters, the forget gradient, data and validation."""

    trainer: pl.Trainer
    processes: _Processes
    model: nn.Module
    names: list[str]
    masks: dict[str, Tensor] | None
    gradient: dict[str, Tensor]
    data: UnlearningData
    batches: Callable[..., Any]
    validation: Any
    validation_loss: Callable[..., float]
    hvp_scale: float


class _Processes:
    """Lightning's strategy as the one distributed layer: sums, broadcasts, agreement on failure.

    With one process every method is the identity.
    """

    def __init__(self, trainer: pl.Trainer, device: torch.device) -> None:
        self.strategy, self.device = trainer.strategy, device
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if self.world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"the trainer has {self.world_size} processes but no process group is running. Under DDP, "
                "attach the callback to trainer.fit, or use `sa-unlearn unlearn`, so that it runs in every process."
            )

    def sum(self, value: Tensor) -> Tensor:
        return self.strategy.reduce(value.to(self.device), reduce_op="sum") if self.world_size > 1 else value

    def min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        return int(self.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="min"))

    def sum_tree(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        """All-reduce a dict of tensors with one collective (flattened into one buffer)."""
        if self.world_size == 1:
            return tree
        flat = self.sum(torch.cat([t.reshape(-1) for t in tree.values()]))
        out, start = {}, 0
        for name, t in tree.items():
            out[name] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.strategy.broadcast(obj) if self.world_size > 1 else obj

    def agree(self, work: Callable[[], Any]) -> Any:
        """Run local ``work``; if it fails on any process, every process raises (none waits forever)."""
        if self.world_size == 1:
            return work()
        error: BaseException | None = None
        try:
            result = work()
        except Exception as caught:  # re-raised below, after the other processes have heard of it
            error, result = caught, None
        failures = self.sum(torch.tensor([float(error is not None)], dtype=torch.float64))
        if error is not None:
            raise error
        if failures.item() > 0:
            raise RuntimeError(
                "another process failed while unlearning (its error is in its log); the weights were restored."
            )
        return result


class _Relabelled:
    """``(x of a forget batch, y of the aligned corrected batch)``: D_f's inputs under D̃_f's labels."""

    def __init__(self, inputs: Iterable[Any], labels: Iterable[Any]) -> None:
        self.inputs, self.labels = inputs, labels

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for forget_batch, corrected_batch in zip(self.inputs, self.labels):
            yield split_batch(forget_batch)[0], split_batch(corrected_batch)[1]


class _Batches:
    """This process's shard of a loader, with labels checked; iterable many times (one pass per τ)."""

    def __init__(
        self,
        loader: Any,
        num_classes: int,
        what: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        seed: int = 0,
        shuffle: bool = False,
    ) -> None:
        self.loader, self.num_classes, self.what = loader, num_classes, what
        self.options = dict(rank=rank, world_size=world_size, max_samples=max_samples, seed=seed, shuffle=shuffle)

    def source(self) -> Iterable[Any]:
        return shard(self.loader, **self.options)

    def __iter__(self) -> Iterator[Any]:
        return checked_labels(self.source(), self.num_classes, self.what)

    def __len__(self) -> int:
        length = sized(self.source())
        if length is None:
            raise TypeError(f"the {self.what} loader has no length")
        return length


def _dataset_size(loader: Any) -> int | None:
    return len(loader.dataset) if is_map_style(loader) else None


def _count_updated(model: nn.Module, names: Sequence[str], masks: dict[str, Tensor] | None) -> int:
    params = dict(model.named_parameters())
    return sum(int(masks[n].sum()) if masks and n in masks else params[n].numel() for n in names)


def _check_aligned(forget: Any, corrected: Any) -> None:
    if corrected is not None and is_map_style(forget) and is_map_style(corrected):
        if len(forget.dataset) != len(corrected.dataset) or forget.batch_size != corrected.batch_size:
            raise ValueError(
                f"the forget and corrected sets differ in length ({len(forget.dataset)} vs "
                f"{len(corrected.dataset)} samples, batch sizes {forget.batch_size} vs {corrected.batch_size}). "
                "corrected_dataloader must serve the same samples as forget_dataloader, in the same order "
                "and with the same batch size; only labels or features may differ."
            )


def _check_arguments(**a: Any) -> None:
    """Fail at construction, with what to do, on arguments that can never work."""

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    require(a["update"] in UPDATES, f"unknown update {a['update']!r}; choose one of {UPDATES}.")
    selection = a["selection"]
    if isinstance(selection, str):
        require(
            selection in SELECTION_RULES,
            f"unknown selection {selection!r}; use one of {SELECTION_RULES} or a list of module paths.",
        )
    else:
        require(bool(list(selection)), "selection is an empty list; name at least one module path.")
    require(a["num_layers"] >= 1, f"num_layers must be >= 1, got {a['num_layers']}.")
    require(
        a["granularity"] in ("layer", "parameter"),
        f"unknown granularity {a['granularity']!r}; choose 'layer' or 'parameter'.",
    )
    if a["granularity"] == "parameter":
        require(
            a["fraction"] is not None and 0 < a["fraction"] <= 1,
            f"granularity='parameter' needs a fraction in (0, 1], got {a['fraction']!r}.",
        )
        require(
            selection in ("flattest", "sharpest", "newton_decrement"),
            f"granularity='parameter' ranks single entries, which selection={selection!r} cannot do; "
            "use 'flattest', 'sharpest' or 'newton_decrement', or granularity='layer'.",
        )
    else:
        require(a["fraction"] is None, "fraction only applies to granularity='parameter'; remove it or set that.")
    require(
        a["curvature"] in CURVATURE_METHODS, f"unknown curvature {a['curvature']!r}; choose one of {CURVATURE_METHODS}."
    )
    require(
        a["curvature_samples"] is None or a["curvature_samples"] >= 1,
        f"curvature_samples must be >= 1 or None (all), got {a['curvature_samples']}.",
    )
    tau = a["tau"]
    require(tau == "auto" if isinstance(tau, str) else tau >= 0, f"tau must be 'auto' or a number >= 0, got {tau!r}.")
    grid = a["tau_grid"]
    require(
        grid is None or (bool(grid) and all(t >= 0 for t in grid)),
        f"tau_grid must be a non-empty list of numbers >= 0, got {grid!r}.",
    )
    require(
        a["num_probes"] >= 1 and a["validation_samples"] >= 1,
        f"num_probes and validation_samples must be >= 1, got {a['num_probes']}, {a['validation_samples']}.",
    )
    require(a["damping"] >= 0, f"damping must be >= 0, got {a['damping']}; it is the λ of (H + λI).")
    require(a["solver"] in SOLVERS, f"unknown solver {a['solver']!r}; choose one of {SOLVERS}.")
    require(
        a["max_iterations"] >= 1 and a["tolerance"] > 0,
        f"max_iterations must be >= 1 and tolerance > 0, got {a['max_iterations']}, {a['tolerance']}.",
    )
    require(a["lissa_scale"] is None or a["lissa_scale"] > 0, f"lissa_scale must be > 0, got {a['lissa_scale']}.")
    require(a["fallback"] in (None, "first_order"), f"fallback must be None or 'first_order', got {a['fallback']!r}.")
    require(a["steps"] >= 1, f"steps must be >= 1 for update='forget_loss', got {a['steps']}.")
    require(a["retain_weight"] >= 0, f"retain_weight must be >= 0, got {a['retain_weight']}.")
    require(
        a["retain_samples"] is None or a["retain_samples"] >= 1,
        f"retain_samples must be >= 1 or None (all), got {a['retain_samples']}.",
    )
    require(
        a["epochs"] >= 1 and a["lr"] > 0 and 0 <= a["momentum"] < 1 and a["weight_decay"] >= 0,
        "the update needs epochs >= 1, lr > 0, 0 <= momentum < 1 and weight_decay >= 0; got "
        f"{a['epochs']}, {a['lr']}, {a['momentum']}, {a['weight_decay']}.",
    )
    require(a["optimizer"] in OPTIMIZERS, f"unknown optimizer {a['optimizer']!r}; choose one of {OPTIMIZERS}.")
    require(
        a["tau_objective"] in ("validation", "validation_and_forget"),
        f"tau_objective must be 'validation' or 'validation_and_forget', got {a['tau_objective']!r}.",
    )
    unknown = [name for name in a["evaluate"] if name not in EVALUATIONS]
    require(
        not isinstance(a["evaluate"], str) and not unknown,
        f"evaluate takes a list of {EVALUATIONS}, got {a['evaluate']!r}.",
    )
    require(
        a["mia_samples"] >= 4 and a["relearn_samples"] >= 1 and a["relearn_steps"] >= 1 and a["relearn_lr"] > 0,
        "the evaluations need mia_samples >= 4, relearn_samples >= 1, relearn_steps >= 1 and relearn_lr > 0; got "
        f"{a['mia_samples']}, {a['relearn_samples']}, {a['relearn_steps']}, {a['relearn_lr']}.",
    )


def _ready(datamodule: Any, *stages: str) -> Any:
    """Call ``setup`` for the given stages on a LightningDataModule (the test set may not exist after fit)."""
    if isinstance(datamodule, pl.LightningDataModule):
        for stage in stages:
            datamodule.setup(stage)
    return datamodule


def _save_checkpoint(trainer: pl.Trainer, pl_module: nn.Module, path: str) -> None:
    """Save the unlearned model (weights and hyperparameters) so that ``load_from_checkpoint`` reads it.

    Written by rank 0 alone, with no barrier inside, so that a failed write can be agreed on.
    """
    checkpoint = {"state_dict": pl_module.state_dict(), "pytorch-lightning_version": pl.__version__}
    if isinstance(pl_module, pl.LightningModule):
        checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(checkpoint, path)


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


@torch.no_grad()
def _restore(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    for name, t in _tensors(model):
        t.copy_(snapshot[name])


@contextlib.contextmanager
def _frozen_except(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """``requires_grad`` False on every parameter outside ``names`` (the caller restores the flags)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@torch.no_grad()
def _num_classes(model: nn.Module, forget: Any) -> int:
    for x, _ in batches_for(model, forget):
        if len(x):
            return int(model(x[:1]).shape[-1])
    raise ValueError("the forget set is empty: forget_dataloader() served no samples. Nothing to unlearn.")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _min_or_none(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None
