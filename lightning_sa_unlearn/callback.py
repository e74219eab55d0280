"""The Lightning callback: sharpness-aware unlearning at the end of ``fit``, or on demand."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_sa_unlearn.adapters import BATCH_ADAPTERS, BatchAdapter
from lightning_sa_unlearn.adapters.checks import check_forget_set
from lightning_sa_unlearn.context import FAST_DEV_RUN_SAMPLES, UnlearningRun
from lightning_sa_unlearn.curvature import CURVATURES, Curvature, default_curvature
from lightning_sa_unlearn.data import UnlearningData
from lightning_sa_unlearn.evaluations import EVALUATIONS, Evaluation, HeldOutMetrics
from lightning_sa_unlearn.functional import eval_mode, trainable_only
from lightning_sa_unlearn.logging_figures import log_report_figures
from lightning_sa_unlearn.notices import kind_of_unlearning
from lightning_sa_unlearn.outputs import OutputFiles, planned_outputs, write_files
from lightning_sa_unlearn.parts import check_loss_fn, resolve, resolve_list
from lightning_sa_unlearn.pipeline import run_unlearning
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.selection import (
    SELECTIONS,
    Layers,
    Measurements,
    Selected,
    Selection,
    SharpnessFunction,
    trainable_layers,
)
from lightning_sa_unlearn.snapshot import restore_snapshot, take_snapshot
from lightning_sa_unlearn.trainers import quiet_trainer
from lightning_sa_unlearn.unlearned_checkpoints import (
    beside_model_checkpoint,
    drop_optimizer_moments,
    mark,
    not_unlearned_notice,
    refuse_resume,
)
from lightning_sa_unlearn.updates import UPDATES, Update, default_forget_loss


class SharpnessAwareUnlearning(Callback):
    r"""Remove the effect of wrong training data by updating only the layers chosen by curvature.

    At the end of ``trainer.fit`` (or through :meth:`unlearn` on a fitted model) it measures the
    held-out metrics, then ``∇L_forget`` (eq. 7) and ``diag H_learn(θ*)`` (section 4.1) as far as the
    parts need them, picks layers with the ``selection`` part, freezes every other parameter,
    applies the ``update`` part to the picked ones, and measures again (:attr:`report`). Only the
    selected parameters change; every other tensor, BatchNorm buffers included, stays bitwise
    identical. If anything fails midway, the weights are restored before the error is raised.

    Args:
        curvature: a :class:`~lightning_sa_unlearn.curvature.Curvature` or ``"ggn"``, ``"mc_ggn"``,
            ``"hutchinson"``, ``"exact"``, ``"empirical_fisher"``. None: :class:`MonteCarloGGN` (or
            :class:`GGN` for a loss it cannot sample from) when a part needs curvature, read until the
            selection is confident; a configured estimator is always measured and reported.
        selection: a :class:`~lightning_sa_unlearn.selection.Selection`, ``"last"`` (default), ``"flattest"``
            (paper section 4.1), ``"sharpest"``, ``"all"``, ``"newton_decrement"``, ``"validated_layer"``, or a
            list of module paths.
        update: an :class:`~lightning_sa_unlearn.updates.Update` or ``"step_then_fine_tune"`` (default: the
            closed form, then a fine-tune that stops on validation), ``"first_order"`` (the paper's closed
            form), ``"second_order"``, ``"forget_loss"``, ``"fine_tune"``, ``"iterated_first_order"``.
        evaluations: measured besides the held-out metrics (always measured): :class:`Evaluation`
            objects, ``"mia"`` (:class:`MembershipInference`) or ``"relearn"`` (:class:`RelearnAttack`).
        loss_fn: the training loss, ``loss_fn(logits, y)`` with mean reduction.
        seed: seeds all randomness of the run (the caller's global RNG state is left as it was).
        report_path, plot_path: where rank 0 writes the JSON report and the sharpness plot.
        checkpoint_path: save the unlearned model there (a Lightning checkpoint that
            ``load_from_checkpoint`` reads). ``ModelCheckpoint`` files written during training
            hold the model from before unlearning. These files are written only when the whole run
            succeeded, never over the checkpoint the model came from, and never over a file of an
            earlier run unless asked (:attr:`overwrite`, ``unlearn(..., overwrite=True)``);
            ``fast_dev_run`` writes none of them.
        unlearn_on_train_end: unlearn at the end of ``trainer.fit`` (False: only train, and
            unlearn later with :meth:`unlearn` or ``sa-unlearn unlearn``).
        progress_bar: show progress on steps that take more than a couple of seconds (never when
            the trainer has ``enable_progress_bar=False``).
        verbose: print the before/after table when done.
        harm_guard: after the update, compare the validation objective with its value before, per
            sample; a rise beyond noise restores the weights and raises (:mod:`~lightning_sa_unlearn.guard`).
            False keeps any finite update.
        batch_adapter: how batches become ``(inputs, targets)`` and inputs become logits: a
            :class:`~lightning_sa_unlearn.adapters.BatchAdapter` (dict batches, a module without
            ``forward``, several forward arguments, sequence outputs) or ``"tuple"`` (default:
            ``(x, y)`` batches and ``pl_module(x)``). It is checked on one forget batch in
            ``on_fit_start``, before training.
        report_sharpness: when no part needs curvature (``selection="last"``, a list of layers), measure the
            per-layer sharpness for the report on 256 samples of ``GGN`` (timed as reporting); False skips it.
    """

    def __init__(
        self,
        curvature: Curvature | str | None = None,
        selection: Selection | str | list[str] = "last",
        update: Update | str = "step_then_fine_tune",
        evaluations: list[Evaluation | str] | None = None,
        loss_fn: Callable[..., Any] = F.cross_entropy,
        seed: int = 0,
        report_path: str | None = None,
        plot_path: str | None = None,
        checkpoint_path: str | None = None,
        unlearn_on_train_end: bool = True,
        progress_bar: bool = True,
        verbose: bool = True,
        harm_guard: bool = True,
        batch_adapter: BatchAdapter | str = "tuple",
        report_sharpness: bool = True,
    ) -> None:
        self.curvature = None if curvature is None else resolve(curvature, Curvature, CURVATURES, "curvature")
        if isinstance(selection, (list, tuple)):
            selection = Layers(selection)
        self.selection = resolve(selection, Selection, SELECTIONS, "selection")
        self.update = resolve(update, Update, UPDATES, "update")
        self.evaluations = resolve_list(evaluations, Evaluation, EVALUATIONS, "evaluations")
        self.loss_fn, self.seed = check_loss_fn(loss_fn), seed
        self.report_path, self.plot_path, self.checkpoint_path = report_path, plot_path, checkpoint_path
        self.unlearn_on_train_end, self.progress_bar, self.verbose = unlearn_on_train_end, progress_bar, verbose
        self.harm_guard, self.report_sharpness = harm_guard, report_sharpness
        self.batch_adapter = resolve(batch_adapter, BatchAdapter, BATCH_ADAPTERS, "batch_adapter")
        self.report: UnlearningReport | None = None
        """This process's last run (None until one finished)."""
        self.restored_report: UnlearningReport | None = None
        """A report read back from a checkpoint (:meth:`load_state_dict`): an earlier run's, for reference only."""
        self.overwrite = False
        """Replace a report, plot or checkpoint that an earlier run left (``sa-unlearn --overwrite true`` sets it)."""
        self._staged: OutputFiles | None = None  # inside in_validation(): the caller's outputs
        self._unlearned_in_fit, self._saving_unlearned = False, False
        if self._overrides_select_layers():
            if self.selection.granularity != "layer":
                raise ValueError(
                    f"{type(self).__name__} overrides select_layers, which picks whole layers, but selection="
                    f"{self.selection!r} picks single entries. Use a layer rule, or write a Selection part instead."
                )
            rank_zero_deprecation(
                f"{type(self).__name__} overrides select_layers(sharpness), which is deprecated since 0.3 and will "
                "be removed: write the rule as a Selection part (select(measured) reads measured.sharpness) and pass "
                "selection=YourRule(); see docs/parts.md. The override is still used for now."
            )

    # ------------------------------------------------------------------ override points
    def forget_loss(
        self, pl_module: nn.Module, forget_batch: tuple[Tensor, Tensor], corrected_batch: tuple[Tensor, Tensor] | None
    ) -> Tensor:
        """The loss whose gradient drives the update, on one pair of aligned batches.

        Default: paper eq. 7 with sum reduction, ``Σ_{D̃_f} ℓ − Σ_{D_f} ℓ``. ``corrected_batch``
        is None for sample unlearning (then the default is gradient ascent on ``D_f``).
        Batches arrive on the model's device as the batch adapter returns them, ``(inputs,
        targets)``, and ``pl_module(inputs)`` returns the logits as the adapter lays them out.
        Override for a custom forget objective.
        """
        return default_forget_loss(pl_module, forget_batch, corrected_batch, self.loss_fn)

    def select_layers(self, sharpness: dict[str, float]) -> list[str]:
        """Deprecated (0.3; write a :class:`~lightning_sa_unlearn.selection.Selection` part): module paths to update,
        given ``{module path: mean Hessian diagonal}``. Called only when a subclass overrides it."""
        chosen = self.selection.select(Measurements(None, dict.fromkeys(sharpness, []), sharpness=sharpness))
        return chosen.layers if isinstance(chosen, Selected) else list(chosen)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise RuntimeError(
                f"SharpnessAwareUnlearning does not support {type(trainer.strategy).__name__}, which shards "
                "parameters. Use a single device or strategy='ddp' / 'ddp_spawn'."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before training: the selection's layer names, the output files (checked again when unlearning starts:
        ``ModelCheckpoint``'s files are known only then), the forget set, the batch adapter and the model on two
        forget samples."""
        self._unlearned_in_fit = False
        if not self.unlearn_on_train_end:
            return
        if not self._overrides_select_layers():  # a wrong layer name fails now, not after training
            self.selection.check(list(trainable_layers(self.batch_adapter.view(pl_module))))
        if not trainer.fast_dev_run:
            processes = Processes(trainer, _device(pl_module))
            beside = processes.broadcast(self._beside(trainer))
            processes.agree(lambda: self._outputs(trainer, None, beside))
        check_forget_set(trainer.datamodule, pl_module, self.loss_fn, self.batch_adapter)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unlearn_on_train_end:
            self._unlearned_in_fit = True
            self.run(trainer, pl_module, _ready(trainer.datamodule, "test"))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that skipped Lightning's ``on_train_end`` (a finished checkpoint resumed) says why it did not
        unlearn."""
        if self.unlearn_on_train_end and not self._unlearned_in_fit and not trainer.interrupted:
            rank_zero_warn(not_unlearned_notice(trainer))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        refuse_resume(checkpoint, fitting=trainer.state.fn == "fit")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._saving_unlearned:  # the unlearned model's checkpoint: no moments gathered on the poisoned data
            drop_optimizer_moments(checkpoint)
            mark(checkpoint)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``sa-unlearn unlearn`` path: unlearn inside ``trainer.validate``, in every process."""
        if self._staged is not None and not trainer.sanity_checking and not trainer.training:
            self.run(trainer, pl_module, _ready(trainer.datamodule, "fit", "test"))

    # ------------------------------------------------------------------ entry points
    @contextlib.contextmanager
    def in_validation(self, outputs: OutputFiles) -> Iterator[None]:
        """Inside: unlearn at the end of Lightning's validation loop, in every process, quietly, writing the
        files to ``outputs``' temporary names; the caller publishes or discards them (``sa-unlearn unlearn``,
        :meth:`~lightning_sa_unlearn.cli.UnlearningTrainer.unlearn`). Settings come back as they were."""
        saved = self.verbose, self._staged
        self.verbose, self._staged, self.report = False, outputs, None
        try:
            yield
        finally:
            self.verbose, self._staged = saved

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: Any = None,
        trainer: pl.Trainer | None = None,
        overwrite: bool | None = None,
    ) -> UnlearningReport:
        """Unlearn on an already fitted ``model`` without training; returns the report.

        A LightningDataModule gets ``prepare_data()`` and ``setup("fit")``/``setup("test")``
        first. Without a ``trainer``, a minimal one (no logger, no checkpoints) is built.
        ``overwrite``: replace a report, plot or checkpoint left by an earlier run (default:
        :attr:`overwrite`, False: refuse before any work).
        """
        if trainer is None:
            trainer = quiet_trainer(
                accelerator="cpu" if _device(model).type == "cpu" else "auto", enable_progress_bar=self.progress_bar
            )
        if isinstance(datamodule, pl.LightningDataModule):
            datamodule.prepare_data()
        return self.run(trainer, model, _ready(datamodule, "fit", "test"), overwrite=overwrite)

    def run(
        self, trainer: pl.Trainer, pl_module: nn.Module, datamodule: Any = None, overwrite: bool | None = None
    ) -> UnlearningReport:
        """Unlearn on ``pl_module`` with the data of ``datamodule`` (then ``pl_module``).

        Saving ``checkpoint_path``, writing the report and the plot, and logging are part of the
        run: the files go to temporary names first and are renamed into place only when all of it
        succeeded; if anything fails, the weights are restored and the temporary files removed.
        """
        self.report = None
        snapshot = take_snapshot(pl_module)
        staged = self._staged  # set by UnlearningTrainer.unlearn, which then puts the files in place itself
        outputs = staged
        try:
            processes = Processes(trainer, _device(pl_module))
            if outputs is None:  # refused before any work, on every process alike
                beside = processes.broadcast(self._beside(trainer))
                outputs = processes.agree(lambda: self._outputs(trainer, overwrite, beside))
            data = UnlearningData.resolve(datamodule, pl_module)
            notice, warn = kind_of_unlearning(data, datamodule, pl_module)
            (rank_zero_warn if warn else rank_zero_info)(notice)
            run = UnlearningRun(
                trainer,
                processes,
                self.batch_adapter.view(pl_module),
                data,
                loss_fn=self.loss_fn,
                seed=self.seed,
                forget_loss=self.forget_loss,
                progress_bar=self.progress_bar,
                target_class=getattr(datamodule, "target_class", None),
                max_samples=FAST_DEV_RUN_SAMPLES if trainer.fast_dev_run else None,
                curvature=self.curvature or default_curvature(self.loss_fn),
                harm_guard=self.harm_guard,
                adapter=self.batch_adapter,
            )
            selection = self.selection
            if self._overrides_select_layers():  # deprecated: the override as a selection part
                selection = SharpnessFunction(self.select_layers, self.selection.name)
            evaluations = [HeldOutMetrics(), *self.evaluations]
            # trainable_only: the user's requires_grad flags come back as they were, whatever happens
            with torch.inference_mode(False), torch.enable_grad(), run.seeded(), eval_mode(pl_module):
                with trainable_only(pl_module):
                    report = run_unlearning(
                        run, selection, self.update, evaluations, self.curvature is not None, self.report_sharpness
                    )
            # rank 0 writes and publishes; its failures fail every process
            report.unlearned_checkpoint = outputs.path("checkpoint") if "checkpoint" in outputs else None
            self.report = report  # the checkpoint carries it (state_dict)
            run.processes.agree(lambda: self._write(trainer, pl_module, report, outputs))
            run.processes.agree(lambda: self._publish(trainer, report, commit=None if staged else outputs))
        except BaseException:
            self.report = None
            restore_snapshot(pl_module, snapshot)
            if outputs is not None and staged is None and trainer.is_global_zero:
                outputs.discard()
            raise
        self.report = report
        return report

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several instances can sit in one Trainer and its checkpoints."""
        return self._generate_state_key(
            curvature=repr(self.curvature),
            selection=repr(self.selection),
            update=repr(self.update),
            evaluations=repr(self.evaluations),
            seed=self.seed,
            **({} if self.batch_adapter.is_plain else {"batch_adapter": repr(self.batch_adapter)}),
        )

    def state_dict(self) -> dict[str, Any]:
        """The last run's report, so that a checkpoint written after unlearning carries it."""
        return {"report": None if self.report is None else self.report.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a report stored in a checkpoint as :attr:`restored_report`: history, never this run's result.

        :attr:`report` is set only by a run of this process, so that a checkpoint cannot make a run that
        did not happen look finished.
        """
        report = state_dict.get("report")
        try:
            self.restored_report = None if report is None else UnlearningReport.from_dict(report)
        except (TypeError, ValueError) as error:  # history from another version: never a reason to fail
            rank_zero_warn(f"the report stored in the checkpoint cannot be read ({error}); it is ignored.")
            self.restored_report = None

    # ------------------------------------------------------------------ internals
    def _overrides_select_layers(self) -> bool:
        return type(self).select_layers is not SharpnessAwareUnlearning.select_layers

    def _beside(self, trainer: pl.Trainer) -> str | None:
        """At the end of ``fit`` without ``checkpoint_path``: the unlearned checkpoint beside ``ModelCheckpoint``'s."""
        return beside_model_checkpoint(trainer) if trainer.training and not self.checkpoint_path else None

    def _outputs(self, trainer: pl.Trainer, overwrite: bool | None, beside: str | None = None) -> OutputFiles:
        """The files this run will write, checked now: none is an input, none replaces an earlier file unasked."""
        paths = {"checkpoint": self.checkpoint_path or beside, "report": self.report_path, "plot": self.plot_path}
        return planned_outputs(trainer, paths, self.overwrite if overwrite is None else overwrite)

    def _write(self, trainer: pl.Trainer, pl_module: nn.Module, report: UnlearningReport, outputs: OutputFiles) -> None:
        """Rank 0 writes the checkpoint, report and plot to their temporary names; in ``fit``, every process joins
        ``trainer.save_checkpoint`` (the trainer's full state, resumable; rank 0 writes it)."""
        full = "checkpoint" in outputs and trainer.training
        if full:
            self._saving_unlearned = True
            try:
                path = outputs.prepare("checkpoint") if trainer.is_global_zero else outputs.temporary("checkpoint")
                trainer.save_checkpoint(path)
            finally:
                self._saving_unlearned = False
        if trainer.is_global_zero:
            write_files(outputs, report, None if full else (pl_module, {self.state_key: self.state_dict()}))

    def _publish(self, trainer: pl.Trainer, report: UnlearningReport, commit: OutputFiles | None) -> None:
        metrics = report.scalar_metrics()
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:  # figures and the table: TensorBoard, W&B and MLflow loggers only
            log_report_figures(trainer.loggers, report, step=trainer.global_step)
        for logger in trainer.loggers:
            logger.save()  # e.g. CSVLogger writes metrics.csv only on save
        if not trainer.is_global_zero:
            return
        if commit is not None:
            commit.commit()
            if report.unlearned_checkpoint:
                rank_zero_info(f"the unlearned model: {report.unlearned_checkpoint}")
        if self.verbose:
            rank_zero_info("\nSharpness-aware unlearning\n" + report.format_table())


# ---------------------------------------------------------------------- helpers
def _ready(datamodule: Any, *stages: str) -> Any:
    """Call ``setup`` for the given stages on a LightningDataModule (the test set may not exist after fit)."""
    if isinstance(datamodule, pl.LightningDataModule):
        for stage in stages:
            datamodule.setup(stage)
    return datamodule


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


__all__: Sequence[str] = ["SharpnessAwareUnlearning", "quiet_trainer"]
