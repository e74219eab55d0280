"""Trainers the package builds for itself: one device, quiet, writing nothing."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl


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
    with _quiet_lightning():  # no "GPU available: ..." banner
        return pl.Trainer(**{**defaults, **options})


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's informational messages (the device banner, tips) off for the duration; warnings stay."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
