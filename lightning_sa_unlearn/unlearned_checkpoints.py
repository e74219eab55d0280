"""Where the unlearned model goes, as a checkpoint a Lightning user can test, load and resume training from.

* At the end of ``trainer.fit``, the unlearned model is saved beside ``ModelCheckpoint``'s files as
  ``unlearned.ckpt`` (``unlearned-v1.ckpt``, ``-v2``, ... when the name is taken, as ``ModelCheckpoint``
  versions its own): the trainer's full state, loops and optimizers included, so ``fit(ckpt_path=...)``
  resumes from it and ``test(ckpt_path=...)`` tests the unlearned model.
* ``sa-unlearn unlearn`` writes the unlearned weights with the training state of the checkpoint they came from
  (when that one has it): :func:`with_training_state`.
* In both, the optimizers' accumulated moments (momentum, Adam's averages) are dropped: they were gathered on
  the poisoned data and would push the first steps of a resumed run back toward it. Learning rates, schedulers,
  epoch and step counters are kept.
* A weights-only checkpoint of this package cannot resume training: :func:`refuse_resume` says so, in place of
  Lightning's message about ``save_weights_only``.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

STEM = "unlearned"
MARKER = "lightning_sa_unlearn"
"""The key this package adds to the checkpoints it writes: ``{"unlearned": True, "resumable": bool}``."""


def free_name(folder: str, stem: str = STEM, extension: str = ".ckpt") -> str:
    """``folder/stem.ckpt``, or the first free ``folder/stem-v<n>.ckpt`` when taken (``ModelCheckpoint``'s versions)."""
    path, version = os.path.join(folder, stem + extension), 0
    while os.path.lexists(path):
        version += 1
        path = os.path.join(folder, f"{stem}-v{version}{extension}")
    return path


def beside_model_checkpoint(trainer: pl.Trainer) -> str | None:
    """The unlearned checkpoint's path at the end of ``fit``: a free name in the first ``ModelCheckpoint``'s folder
    (None without one: the user keeps no checkpoints)."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    return None if folder is None else free_name(os.fspath(folder))


def drop_optimizer_moments(checkpoint: dict[str, Any]) -> None:
    """Keep each optimizer's settings (``param_groups``: learning rates, ...), drop what it accumulated."""
    checkpoint["optimizer_states"] = [
        {**state, "state": {}} if isinstance(state, dict) and "param_groups" in state else state
        for state in checkpoint.get("optimizer_states", [])
    ]


def mark(checkpoint: dict[str, Any]) -> None:
    """Mark a checkpoint this package wrote, saying whether it can resume training."""
    checkpoint[MARKER] = {"unlearned": True, "resumable": "optimizer_states" in checkpoint and "loops" in checkpoint}


def with_training_state(unlearned: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """The unlearned weights, hyperparameters and callback states with the training state of ``source``, the
    checkpoint they came from, when it has one (loops, optimizers without their moments, schedulers, the other
    callbacks' states); else ``unlearned`` as it is. Marked either way."""
    if "optimizer_states" not in source or "loops" not in source:
        mark(unlearned)
        return unlearned
    merged = {**source, **unlearned}
    merged["callbacks"] = {**source.get("callbacks", {}), **unlearned.get("callbacks", {})}
    drop_optimizer_moments(merged)
    mark(merged)
    return merged


def refuse_resume(checkpoint: dict[str, Any], fitting: bool) -> None:
    """Raise on ``fit(ckpt_path=...)`` from a weights-only checkpoint this package wrote, saying why and what to do."""
    marker = checkpoint.get(MARKER)
    if fitting and isinstance(marker, dict) and not marker.get("resumable", True):
        raise ValueError(
            "this unlearned checkpoint holds the weights only (it was written without a training state: by "
            "callback.unlearn(...) or from a weights-only input), so training cannot resume from it. Load the "
            "weights with YourModel.load_from_checkpoint(path) and call trainer.fit(model) without ckpt_path, or "
            "unlearn at the end of fit (the checkpoint beside ModelCheckpoint's is resumable)."
        )


def not_unlearned_notice(trainer: pl.Trainer) -> str:
    """Why ``fit`` ended without unlearning although the callback was to unlearn at its end (one line)."""
    if trainer.limit_train_batches == 0:
        why = "limit_train_batches=0 skips training, and with it Lightning's on_train_end"
    elif trainer.ckpt_path:
        why = (
            f"the checkpoint {os.fspath(trainer.ckpt_path)!r} had finished training already (epoch "
            f"{trainer.current_epoch}, max_epochs={trainer.max_epochs}), so Lightning skipped the loop and on_train_end"
        )
    else:
        why = "Lightning skipped the training loop and on_train_end"
    return (
        f"unlearning did not run: {why}. Unlearn the fitted model with callback.unlearn(model, datamodule) or "
        "`sa-unlearn unlearn --ckpt_path ...`, or raise max_epochs to train on and unlearn at the end."
    )


__all__ = [
    "MARKER",
    "beside_model_checkpoint",
    "drop_optimizer_moments",
    "free_name",
    "mark",
    "not_unlearned_notice",
    "refuse_resume",
    "with_training_state",
]
