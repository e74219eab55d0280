"""``sa-unlearn``: LightningCLI with an ``unlearn`` subcommand.

    sa-unlearn fit --config examples/mnist_targeted.yaml
    sa-unlearn unlearn --config examples/mnist_targeted.yaml --ckpt_path outputs/mnist_targeted/fitted.ckpt

``unlearn`` loads the fitted checkpoint, runs the ``SharpnessAwareUnlearning`` callback configured
under ``trainer.callbacks``, writes the unlearned model to a NEW checkpoint (the input is never
touched) with the JSON report and the run's config beside it, and prints the before/after table.
No file of an earlier run is replaced without ``--overwrite true``. It runs under the
trainer's strategy, DDP included: the work happens inside Lightning's validate call, in every
process.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sa_unlearn.callback import SharpnessAwareUnlearning
from lightning_sa_unlearn.checkpoints import check_model_class, model_arguments, read_checkpoint
from lightning_sa_unlearn.guard import HarmfulUpdateError
from lightning_sa_unlearn.outputs import OutputFiles
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.unlearned_checkpoints import with_training_state


class UnlearningTrainer(pl.Trainer):
    """A Trainer with :meth:`unlearn`, the method behind ``sa-unlearn unlearn``."""

    unlearning = False
    """True while :meth:`unlearn` runs (then :class:`SaveRunConfig` leaves the config to it)."""

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_path: str | None = None,
        weights_only: bool = True,
        overwrite: bool = False,
    ) -> UnlearningReport:
        """Unlearn on the model in ``ckpt_path`` and save it to ``output_path``.

        It runs inside ``validate`` (so under every strategy), which needs a ``val_dataloader`` and
        a ``validation_step``. Under ``ddp_spawn`` the ``model`` object in this process is not
        updated: load the result from ``output_path``.

        Every output (the checkpoint, the report, the callback's plot and, from ``sa-unlearn``, the
        run's config) is checked before any work: none may be the input checkpoint (links included),
        and none may replace a file of an earlier run unless ``overwrite``. They are written to
        temporary names and renamed into place only when the whole run succeeded. Under
        ``fast_dev_run`` nothing is written.

        Args:
            model: the LightningModule class the checkpoint was saved from.
            datamodule: serves the data contract (forget, corrected, retain, val, test loaders).
            ckpt_path: the fitted checkpoint; read only, never overwritten.
            output_path: the new checkpoint (default: ``<ckpt>.unlearned.ckpt`` beside the input);
                the report goes to ``<output>.report.json`` unless the callback sets ``report_path``,
                and ``sa-unlearn`` saves the run's config to ``<output>.config.yaml``.
            weights_only: load the checkpoint with ``torch.load(weights_only=True)``.
            overwrite: replace outputs left by an earlier run (``sa-unlearn unlearn --overwrite true``).
        """
        callback = self._unlearning_callback()
        ckpt_path = _check_checkpoint(model, ckpt_path, weights_only)
        output_path = output_path or os.path.splitext(ckpt_path)[0] + ".unlearned.ckpt"
        stem = os.path.splitext(output_path)[0]
        outputs = OutputFiles(overwrite, {"the input checkpoint": ckpt_path})
        outputs.add("checkpoint", output_path, "output_path")
        outputs.add("report", callback.report_path or stem + ".report.json", "the report")
        if callback.plot_path:
            outputs.add("plot", callback.plot_path, "plot_path")
        config = next((c for c in self.callbacks if isinstance(c, SaveRunConfig)), None)
        if config is not None:
            outputs.add("config", stem + ".config.yaml", "the run's config")
        self.unlearning = True
        snapshot = copy.deepcopy(model.state_dict())  # the model as it came, restored if anything fails
        try:
            with callback.in_validation(outputs):
                self.validate(
                    model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=weights_only
                )
                # only this run's: a report restored from the checkpoint is kept apart (restored_report); under
                # ddp_spawn the parent reads the temporary file rank 0 wrote for this run (a fresh name)
                report = callback.report
            if report is None and os.path.exists(outputs.temporary("report")):
                report = UnlearningReport.from_json(outputs.temporary("report"))
            if report is None:
                raise RuntimeError(
                    "unlearning did not run: `sa-unlearn unlearn` works inside Lightning's validation loop, which "
                    "was skipped. Give the datamodule a val_dataloader() and the model a validation_step, and keep "
                    "limit_val_batches above 0."
                )
            if self.is_global_zero:
                if self.fast_dev_run:
                    outputs.discard()
                else:
                    if config is not None:
                        config.save_to(outputs.prepare("config"))
                    _resumable(outputs.temporary("checkpoint"), ckpt_path, weights_only)
                    outputs.commit()
        except BaseException:
            model.load_state_dict(snapshot, strict=False)  # a buffer the run added stays; the rest as it came
            if self.is_global_zero:
                outputs.discard()
            raise
        finally:
            self.unlearning = False
        if self.is_global_zero:
            print(report.format_table())
            names = {"checkpoint": "unlearned checkpoint", "report": "report", "plot": "plot", "config": "config"}
            written = [f"{name}: {outputs.path(role)}" for role, name in names.items() if role in outputs]
            print("\n" + ("fast_dev_run: nothing was written" if self.fast_dev_run else "\n".join(written)))
        return report

    def _unlearning_callback(self) -> SharpnessAwareUnlearning:
        found = [c for c in self.callbacks if isinstance(c, SharpnessAwareUnlearning)]
        if len(found) != 1:
            raise ValueError(
                f"`unlearn` needs exactly one SharpnessAwareUnlearning under trainer.callbacks, found {len(found)}. "
                "Add `- class_path: lightning_sa_unlearn.SharpnessAwareUnlearning` to trainer.callbacks in your config."
            )
        return found[0]


TRUST_HINT = "--weights_only false (sa-unlearn) or weights_only=False (Python)"


def _resumable(written: str, ckpt_path: str, weights_only: bool) -> None:
    """Give the unlearned checkpoint the training state of the one it came from (when that has one), so that
    ``fit --ckpt_path`` resumes from it (:func:`~lightning_sa_unlearn.unlearned_checkpoints.with_training_state`)."""
    unlearned = torch.load(written, weights_only=False)  # written by this run, moments ago
    merged = with_training_state(unlearned, read_checkpoint(ckpt_path, weights_only, trust_hint=TRUST_HINT))
    if merged is not unlearned:
        torch.save(merged, written)


def _configured_class(class_path: str | None) -> type | None:
    """The class the user's own config names (importing it is what the config asks for); None if it cannot be."""
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _check_checkpoint(model: pl.LightningModule, ckpt_path: str | None, weights_only: bool) -> str:
    """Fail early, with a clear message, on a missing or unreadable file or a checkpoint of another model."""
    if not ckpt_path:
        raise ValueError("`unlearn` needs --ckpt_path, the checkpoint of the fitted model.")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; pass the path of a fitted checkpoint.")
    checkpoint = read_checkpoint(ckpt_path, weights_only, trust_hint=TRUST_HINT)
    check_model_class(checkpoint, type(model), None, ckpt_path)
    expected, found = set(model.state_dict()), set(checkpoint["state_dict"])
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_path} does not fit {type(model).__name__}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Was it saved from a different model class or configuration?"
        )
    return ckpt_path


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saving, as one file, through the same checks and publishing as every output.

    ``unlearn`` runs save theirs beside the unlearned checkpoint (``<output>.config.yaml``), with its other
    outputs; ``fit``, ``validate``, ``test`` and ``predict`` save ``config.yaml`` in the log folder. The config
    is written whole (sub-configs given as files are inlined, never written beside it), to a temporary
    name, and published only if no file of that name exists (unless ``--overwrite true``).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer, "unlearning", False) or self.already_saved:
            return  # UnlearningTrainer.unlearn writes it with the run's other outputs
        if self.save_to_log_dir and "://" in str(trainer.log_dir):
            return super().setup(trainer, pl_module, stage)  # a remote log folder: Lightning's own saving
        if self.save_to_log_dir:
            path = os.path.join(trainer.log_dir, self.config_filename)  # log_dir is broadcast from rank 0

            def publish() -> None:
                if trainer.is_global_zero:
                    outputs = OutputFiles(self.overwrite)
                    outputs.add("config", path, "the run's config")
                    self.save_to(outputs.prepare("config"))
                    outputs.commit()

            Processes(trainer, pl_module.device).agree(publish)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_to(self, path: str) -> None:
        """Write the whole config, as one YAML file, to ``path`` (a fresh temporary file)."""
        text = self.parser.dump(self.config, skip_none=False)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)


class SAUnlearnCLI(LightningCLI):
    """LightningCLI plus the ``unlearn`` subcommand and ``--overwrite``; checkpoints are read as data only."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "unlearn": {"model", "datamodule", "overwrite"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Replace files an earlier run left: config.yaml, and the unlearned checkpoint, report and plot "
            "(default: refuse them before any work).",
        )

    def _parse_ckpt_path(self) -> None:
        """Apply the checkpoint's hyperparameters to the config's model, reading the checkpoint as data only.

        Replaces LightningCLI's version, which loads the class a checkpoint names (and so imports its module and
        runs its ``__init__``). Here the config decides the class: a checkpoint naming another is refused
        (:func:`~lightning_sa_unlearn.checkpoints.check_model_class`), and only plain-data hyperparameters are
        applied, as the config's model's arguments.
        """
        subcommand = self.config.get("subcommand")
        settings = self.config[subcommand] if subcommand else {}
        ckpt_path = settings.get("ckpt_path")
        if not (ckpt_path and os.path.isfile(ckpt_path)):
            return
        checkpoint = read_checkpoint(ckpt_path, settings.get("weights_only") is not False, trust_hint=TRUST_HINT)
        model = settings.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        cls = _configured_class(class_path)
        check_model_class(checkpoint, cls, class_path, ckpt_path)
        arguments, left_out = model_arguments(checkpoint, cls)
        if left_out:
            rank_zero_warn(
                f"{ckpt_path}: hyperparameters {left_out} are not applied (a value that names a "
                f"class, or not a plain-typed argument of {class_path}: nothing a checkpoint names is imported); "
                "the values of your config are used."
            )
        if not (arguments and class_path):
            return
        update = {subcommand: {"model": {"class_path": class_path, "init_args": arguments}}}
        try:
            self.config = self.parser.parse_object(update, self.config)
        except (SystemExit, Exception) as error:
            raise ValueError(
                f"the hyperparameters stored in {ckpt_path} ({sorted(arguments)}) do not fit the model of your "
                f"config, {class_path}: was the checkpoint saved from another model or version?"
            ) from error

    def before_instantiate_classes(self) -> None:
        self.save_config_kwargs["overwrite"] = bool(self._get(self.config, "overwrite", False))

    def after_instantiate_classes(self) -> None:
        overwrite = bool(self._get(self.config, "overwrite", False))
        for callback in self.trainer.callbacks:
            if isinstance(callback, SharpnessAwareUnlearning):
                callback.overwrite = overwrite  # unlearning at the end of fit

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "unlearn":
            kwargs["overwrite"] = bool(self._get(self.config, "overwrite", False))
        return kwargs


def main(args: Any = None) -> None:
    """``sa-unlearn``: LightningCLI's subcommands plus ``unlearn``."""
    argv = list(args) if args is not None else sys.argv[1:]
    if argv[:1] == ["benchmark"]:
        raise SystemExit(
            "sa-unlearn benchmark was removed in 0.2: the experiments are not part of the installed package. "
            "From a clone of the repository run `python benchmarks/reproduce.py --setting mnist_targeted` instead."
        )
    SAUnlearnCLI(trainer_class=UnlearningTrainer, args=args, save_config_callback=SaveRunConfig)


REFUSALS = (ValueError, OSError, HarmfulUpdateError)
"""What a run refuses with a message that says what to do: the console prints that line, not a traceback."""


def console(args: Any = None) -> None:
    """The ``sa-unlearn`` command: :func:`main`, with a refusal printed as one line (``SA_UNLEARN_TRACEBACK=1``
    shows the traceback too) and exit status 1."""
    try:
        main(args)
    except REFUSALS as error:
        if os.environ.get("SA_UNLEARN_TRACEBACK"):
            raise
        print(f"sa-unlearn: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    console()
