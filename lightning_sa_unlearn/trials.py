"""Selection by trial updates, for a rule with ``trials = True`` (:class:`~lightning_sa_unlearn.ValidatedLayer`):
run the update on each candidate, judge it, restore. Orchestration, called by the pipeline alone: it runs an
update part and sets the run's selection, which no part does."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lightning_sa_unlearn.data import limit_samples
from lightning_sa_unlearn.functional import batches_for, trainable_only
from lightning_sa_unlearn.selection.rules import Measurements, ValidatedLayer
from lightning_sa_unlearn.updates.base import Update, UpdateResult

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


def select_by_trial(
    run: RunContext, rule: ValidatedLayer, update: Update, layers: dict[str, list[str]], measured: Measurements
) -> tuple[list[str], dict[str, Any], list[dict[str, Any]]]:
    """Update each candidate from the same weights, judge it on validation, keep the best one's weights.

    Returns the winner's layers, its update outcome, and one record per trial for the report. Every
    process judges on all-reduced losses, so all keep the same candidate.
    """
    if run.validation_sample is None:
        raise ValueError(
            "ValidatedLayer judges candidates on validation data: define val_dataloader() or retain_dataloader()."
        )
    model, params = run.model, dict(run.model.named_parameters())
    share = math.ceil(rule.judge_samples / run.processes.world_size)
    judge = list(batches_for(model, limit_samples(run.validation_sample, share)))
    candidates = run.processes.broadcast(rule.candidates(measured))
    trials, states = [], []
    for candidate in candidates:
        run.names, run.masks = [n for layer in candidate for n in layers[layer]], None
        start = {n: params[n].detach().clone() for n in run.names}
        with trainable_only(model, run.names):
            outcome = UpdateResult.of(update.apply(run))
        loss = run.mean_loss(model, judge)
        if run.relabelled is not None:
            loss += run.mean_loss(model, run.relabelled)
        states.append(({n: params[n].detach().clone() for n in run.names}, outcome, list(run.names)))
        with torch.no_grad():
            for n, value in start.items():
                params[n].copy_(value)
        trials.append(
            {
                "layers": candidate,
                "validation_objective": loss,
                "tau": outcome.tau,
                "update_steps": outcome.steps,
                "parameters": sum(params[n].numel() for n in run.names),
            }
        )
    best = min(
        range(len(trials)),
        key=lambda i: (_finite(trials[i]["validation_objective"]), trials[i]["parameters"]),
    )
    after, outcome, run.names = states[best]
    with torch.no_grad():
        for n, value in after.items():
            params[n].copy_(value)
    for i, trial in enumerate(trials):
        trial["chosen"] = i == best
    return trials[best]["layers"], outcome, trials


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf
