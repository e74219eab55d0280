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

import importlib
import os
import sys
import zipfile
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_sa_unlearn.callback import SharpnessAwareUnlearning
from lightning_sa_unlearn.outputs import OutputFiles
from lightning_sa_unlearn.report import UnlearningReport


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
        saved = callback.verbose, callback._staged
        callback.verbose, callback._staged, callback.unlearn_on_validation_end = False, outputs, True
        callback.report, self.unlearning = None, True
        try:
            self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=weights_only)
            report = callback.report  # None in the parent of ddp_spawn: rank 0 wrote the report's file
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
                    outputs.commit()
        except BaseException:
            if self.is_global_zero:
                outputs.discard()
            raise
        finally:
            (callback.verbose, callback._staged), callback.unlearn_on_validation_end = saved, False
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


def read_checkpoint(ckpt_path: str, weights_only: bool = True) -> dict[str, Any]:
    """The checkpoint's contents, or a clear error for a file that is empty, cut short or not a checkpoint."""
    size = os.path.getsize(ckpt_path)
    if size == 0:
        raise ValueError(f"checkpoint {ckpt_path!r} is empty (0 bytes); was it written completely?")
    with open(ckpt_path, "rb") as f:
        start = f.read(4)
    archive = start == b"PK\x03\x04"  # torch.save writes a zip archive (older versions: a pickle, b"\x80...")
    if not archive and not start.startswith(b"\x80"):
        raise ValueError(
            f"{ckpt_path!r} ({size:,} bytes) is not a PyTorch checkpoint: it does not start like one. Pass the "
            ".ckpt file that `sa-unlearn fit` (ModelCheckpoint) wrote."
        )
    if archive and not zipfile.is_zipfile(ckpt_path):
        raise ValueError(
            f"checkpoint {ckpt_path!r} ({size:,} bytes) is cut short: its zip archive has no end. Was it copied or "
            "written completely?"
        )
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        if archive and weights_only and "Weights only load failed" in str(error):
            raise ValueError(
                f"checkpoint {ckpt_path!r} holds objects that torch.load(weights_only=True) refuses. If you trust "
                "the file, pass weights_only=False (`--weights_only false`)."
            ) from error
        raise ValueError(
            f"checkpoint {ckpt_path!r} ({size:,} bytes) cannot be read as a PyTorch checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). It may be truncated or "
            "not a checkpoint at all; pass the .ckpt file that `sa-unlearn fit` (ModelCheckpoint) wrote."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(class_path: str) -> Any:
    """The class a dotted path names (the path itself when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def check_model_class(checkpoint: dict[str, Any], class_path: str | None, ckpt_path: str) -> None:
    """Refuse a checkpoint whose hyperparameters name another LightningModule class than the config."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if saved and class_path and saved != class_path and _resolve(saved) is not _resolve(class_path):
        raise ValueError(
            f"{ckpt_path} was saved from {saved}, but the model is {class_path}. Pass the model class the "
            f"checkpoint was fitted with (--model {saved}), or a checkpoint of {class_path}."
        )


def _check_checkpoint(model: pl.LightningModule, ckpt_path: str | None, weights_only: bool) -> str:
    """Fail early, with a clear message, on a missing or unreadable file or a checkpoint of another model."""
    if not ckpt_path:
        raise ValueError("`unlearn` needs --ckpt_path, the checkpoint of the fitted model.")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; pass the path of a fitted checkpoint.")
    checkpoint = read_checkpoint(ckpt_path, weights_only)
    check_model_class(checkpoint, _class_path(type(model)), ckpt_path)
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
    """LightningCLI's config saving that never replaces a config of an earlier run unless ``--overwrite true``.

    ``unlearn`` runs save theirs beside the unlearned checkpoint (``<output>.config.yaml``), with its other
    outputs; ``fit``, ``validate``, ``test`` and ``predict`` save ``config.yaml`` in the log folder.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(trainer, "unlearning", False):
            return  # UnlearningTrainer.unlearn writes it with the run's other outputs
        if self.save_to_log_dir and not self.overwrite and not self.already_saved:
            path = os.path.join(trainer.log_dir, self.config_filename)
            exists = trainer.strategy.broadcast(os.path.isfile(path) if trainer.is_global_zero else False)
            if exists:
                raise FileExistsError(
                    f"{path} exists, from an earlier run; sa-unlearn does not replace it. Delete it, write this run "
                    "elsewhere (trainer.default_root_dir, or a logger that makes a folder per version), or pass "
                    "--overwrite true."
                )
        super().setup(trainer, pl_module, stage)

    def save_to(self, path: str) -> None:
        self.parser.save(self.config, path, skip_none=False, overwrite=True)


class SAUnlearnCLI(LightningCLI):
    """LightningCLI plus the ``unlearn`` subcommand and ``--overwrite``."""

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
        """Read the checkpoint with clear errors before LightningCLI applies its hyperparameters to the model."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and os.path.isfile(ckpt_path):
            checkpoint = read_checkpoint(ckpt_path, weights_only=True)
            model = self.config[subcommand].get("model")
            check_model_class(checkpoint, model.get("class_path") if hasattr(model, "get") else None, ckpt_path)
        super()._parse_ckpt_path()

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


if __name__ == "__main__":
    main()
