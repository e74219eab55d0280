"""``sa-unlearn``: LightningCLI with an ``unlearn`` subcommand.

    sa-unlearn fit --config examples/mnist_targeted.yaml
    sa-unlearn unlearn --config examples/mnist_targeted.yaml --ckpt_path outputs/mnist_targeted/fitted.ckpt

``unlearn`` loads the fitted checkpoint, runs the ``SharpnessAwareUnlearning`` callback configured
under ``trainer.callbacks``, writes the unlearned model to a NEW checkpoint (the input is never
touched) with the JSON report beside it, and prints the before/after table. It runs under the
trainer's strategy, DDP included: the work happens inside Lightning's validate call, in every
process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_sa_unlearn.callback import SharpnessAwareUnlearning
from lightning_sa_unlearn.report import UnlearningReport


class UnlearningTrainer(pl.Trainer):
    """A Trainer with :meth:`unlearn`, the method behind ``sa-unlearn unlearn``."""

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        output_path: str | None = None,
        weights_only: bool = True,
    ) -> UnlearningReport:
        """Unlearn on the model in ``ckpt_path`` and save it to ``output_path``.

        It runs inside ``validate`` (so under every strategy), which needs a ``val_dataloader`` and
        a ``validation_step``. Under ``ddp_spawn`` the ``model`` object in this process is not
        updated: load the result from ``output_path``.

        Args:
            model: the LightningModule class the checkpoint was saved from.
            datamodule: serves the data contract (forget, corrected, retain, val, test loaders).
            ckpt_path: the fitted checkpoint; read only, never overwritten.
            output_path: the new checkpoint (default: ``<ckpt>.unlearned.ckpt`` beside the input);
                the report goes to ``<output>.report.json`` unless the callback sets ``report_path``.
            weights_only: load the checkpoint with ``torch.load(weights_only=True)``.
        """
        callback = self._unlearning_callback()
        ckpt_path = _check_checkpoint(model, ckpt_path, weights_only)
        output_path = output_path or os.path.splitext(ckpt_path)[0] + ".unlearned.ckpt"
        if os.path.abspath(output_path) == os.path.abspath(ckpt_path):
            raise ValueError(f"output_path is the input checkpoint {ckpt_path}; choose a new file.")
        callback.report_path = callback.report_path or os.path.splitext(output_path)[0] + ".report.json"
        if os.path.exists(callback.report_path):  # a stale report must not pass for this run's
            os.remove(callback.report_path)
        saved = callback.verbose, callback.checkpoint_path
        callback.verbose, callback.checkpoint_path, callback.unlearn_on_validation_end = False, output_path, True
        try:
            self.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=weights_only)
        finally:
            (callback.verbose, callback.checkpoint_path), callback.unlearn_on_validation_end = saved, False
        if not os.path.exists(callback.report_path):
            raise RuntimeError(
                "unlearning did not run: `sa-unlearn unlearn` works inside Lightning's validation loop, which was "
                "skipped. Give the datamodule a val_dataloader() and the model a validation_step, and keep "
                "limit_val_batches above 0."
            )
        report = UnlearningReport.from_json(callback.report_path)  # written by rank 0, also under ddp_spawn
        if self.is_global_zero:
            print(report.format_table())
            print(f"\nunlearned checkpoint: {output_path}\nreport: {callback.report_path}")
        return report

    def _unlearning_callback(self) -> SharpnessAwareUnlearning:
        found = [c for c in self.callbacks if isinstance(c, SharpnessAwareUnlearning)]
        if len(found) != 1:
            raise ValueError(
                f"`unlearn` needs exactly one SharpnessAwareUnlearning under trainer.callbacks, found {len(found)}. "
                "Add `- class_path: lightning_sa_unlearn.SharpnessAwareUnlearning` to trainer.callbacks in your config."
            )
        return found[0]


def _check_checkpoint(model: pl.LightningModule, ckpt_path: str | None, weights_only: bool) -> str:
    """Fail early, with a clear message, on a missing file or a checkpoint of another model."""
    if not ckpt_path:
        raise ValueError("`unlearn` needs --ckpt_path, the checkpoint of the fitted model.")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; pass the path of a fitted checkpoint.")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict').")
    expected, found = set(model.state_dict()), set(checkpoint["state_dict"])
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_path} does not fit {type(model).__name__}: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Was it saved from a different model class or configuration?"
        )
    return ckpt_path


class SAUnlearnCLI(LightningCLI):
    """LightningCLI plus the ``unlearn`` subcommand."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "unlearn": {"model", "datamodule"}}


def main(args: Any = None) -> None:
    """``sa-unlearn``: LightningCLI's subcommands plus ``unlearn``."""
    argv = list(args) if args is not None else sys.argv[1:]
    if argv[:1] == ["benchmark"]:
        raise SystemExit(
            "sa-unlearn benchmark was removed in 0.2: the experiments are not part of the installed package. "
            "From a clone of the repository run `python benchmarks/reproduce.py --setting mnist_targeted` instead."
        )
    SAUnlearnCLI(trainer_class=UnlearningTrainer, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
