"""Selection by trial updates, for a rule with ``trials = True`` (:class:`~lightning_sa_unlearn.ValidatedLayer`):
run the update on each candidate, judge it on the validation objective, restore. Orchestration, called by the
pipeline alone: it runs an update part and decides the run's selection, which no part does."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lightning_sa_unlearn.functional import trainable_only
from lightning_sa_unlearn.objective import ValidationObjective
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.selection.rules import Measurements, ValidatedLayer
from lightning_sa_unlearn.updates.base import Update, UpdateInputs, UpdateResult


def select_by_trial(
    rule: ValidatedLayer,
    update: Update,
    layers: dict[str, list[str]],
    measured: Measurements,
    objective: ValidationObjective | None,
    inputs_for: Callable[[list[str]], UpdateInputs],
    processes: Processes,
) -> tuple[list[str], list[str], UpdateResult, list[dict[str, Any]]]:
    """Update each candidate from the same weights, judge it on validation, keep the best one's weights.

    ``inputs_for(names)`` gives the update's inputs for a candidate's parameters. Returns the winner's layers,
    its parameter names, its update outcome, and one record per trial for the report. Every process judges on
    all-reduced losses, so all keep the same candidate.
    """
    if objective is None:
        raise ValueError(
            "ValidatedLayer judges candidates on validation data: define val_dataloader() or retain_dataloader()."
        )
    model = measured.model
    params = dict(model.named_parameters())
    judge = objective.subset(rule.judge_samples)
    candidates = processes.broadcast(rule.candidates(measured))
    trials, states = [], []
    for candidate in candidates:
        names = [n for layer in candidate for n in layers[layer]]
        start = {n: params[n].detach().clone() for n in names}
        with trainable_only(model, names):
            outcome = UpdateResult.of(update.apply(inputs_for(names)))
        loss = objective(model, judge)
        states.append(({n: params[n].detach().clone() for n in names}, outcome, names))
        with torch.no_grad():
            for n, value in start.items():
                params[n].copy_(value)
        trials.append(
            {
                "layers": candidate,
                "validation_objective": loss,
                "tau": outcome.tau,
                "update_steps": outcome.steps,
                "parameters": sum(params[n].numel() for n in names),
            }
        )
    best = min(
        range(len(trials)),
        key=lambda i: (_finite(trials[i]["validation_objective"]), trials[i]["parameters"]),
    )
    after, outcome, names = states[best]
    with torch.no_grad():
        for n, value in after.items():
            params[n].copy_(value)
    for i, trial in enumerate(trials):
        trial["chosen"] = i == best
    return trials[best]["layers"], names, outcome, trials


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.inf
