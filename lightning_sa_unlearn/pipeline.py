"""The unlearning run: a few stages over one context, :class:`UnlearningRun`.

Stages, in order (each computes only what the configured parts declared they need):

1. ``prepare``: resolve the data contract, check every part against it, build this process's batches;
2. ``evaluate("before")``: held-out metrics and the other evaluations;
3. ``forget_gradient``: ``∇L_forget`` (eq. 7), if the selection or the update needs it;
4. ``curvature``: ``diag H`` (section 4.1), if a part needs it or the user configured an estimator;
5. ``select``: per-layer sharpness, then the selection rule;
6. ``update``: the validation set if the update reads one, then the update on the selected parameters;
7. ``evaluate("after")``, then the report.

The context (:class:`UnlearningRun`) holds the data, settings and services; what a stage measures is a local
here, passed to the later stages as arguments. The callback wraps a run in snapshot and rollback.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sa_unlearn.adapters.checks import check_finite_weights, non_finite_samples
from lightning_sa_unlearn.context import UnlearningRun
from lightning_sa_unlearn.counting import PASS_KINDS, UNLEARNING_STAGES, count_samples
from lightning_sa_unlearn.curvature import GGN, CurvatureResult, selection_margin
from lightning_sa_unlearn.data import check_aligned, limit_samples, training_set_size
from lightning_sa_unlearn.evaluations import Evaluation
from lightning_sa_unlearn.functional import require_trainable_parameters, trainable_only
from lightning_sa_unlearn.guard import HarmGuard
from lightning_sa_unlearn.notices import unchanged_model
from lightning_sa_unlearn.objective import ValidationObjective, choose_validation
from lightning_sa_unlearn.processes import SummedState
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.selection import (
    Measurements,
    Selected,
    Selection,
    layer_sharpness,
    newton_decrement,
    trainable_layers,
)
from lightning_sa_unlearn.trials import select_by_trial
from lightning_sa_unlearn.updates import Update, UpdateInputs, UpdateResult, ValidationSpec

REPORT_SAMPLES = 256
"""Curvature samples read for the report alone when no part chooses by curvature (``LastLayer``, ...)."""
FINITE_CHECK_SAMPLES = 512


def run_unlearning(
    run: UnlearningRun,
    selection: Selection,
    update: Update,
    evaluations: list[Evaluation],
    measure_curvature: bool,
    report_sharpness: bool = True,
) -> UnlearningReport:
    """Every stage on ``run.model``; raises (leaving restoration to the caller) on any failure.

    ``measure_curvature``: measure the configured estimator even if no part needs it. ``report_sharpness``: when
    no part needs curvature, measure :data:`REPORT_SAMPLES` samples of ``GGN`` for the report's per-layer sharpness.
    """
    counting = count_samples(run.model, run.count)  # the report's sample_passes
    try:
        return _run_stages(run, selection, update, evaluations, measure_curvature, report_sharpness)
    finally:
        counting.remove()


def _run_stages(
    run: UnlearningRun,
    selection: Selection,
    update: Update,
    evaluations: list[Evaluation],
    measure_curvature: bool,
    report_sharpness: bool,
) -> UnlearningReport:
    total_start = time.perf_counter()
    require_trainable_parameters(run.model)
    check_finite_weights(run.model)  # before any work: a broken checkpoint, not the loss or the data
    layers = trainable_layers(run.model)
    check_aligned(run.data.forget, run.data.corrected)
    update.check(run)
    for evaluation in evaluations:
        evaluation.check(run)
    selection.check(list(layers))
    run.build_batches()
    results: dict[Evaluation, dict[str, Any]] = {evaluation: {} for evaluation in evaluations}

    def evaluate(stage: str) -> None:
        for evaluation in evaluations:
            if stage in evaluation.stages:
                with run.stage(evaluation.key):
                    results[evaluation][stage] = evaluation.measure(run)

    evaluate("before")
    gradient = None
    if selection.needs_forget_gradient:  # the rule reads the whole gradient
        with run.stage("forget_gradient"):
            gradient = run.forget_gradient()
    estimator, curvature = run.curvature, None
    if selection.needs_curvature or update.needs_curvature or measure_curvature:
        # a configured estimator that no part reads feeds the report alone: timed as reporting
        needed = selection.needs_curvature or update.needs_curvature
        with run.stage("curvature" if needed else "curvature_report"):
            curvature = estimator.measure(run, selection.stopping_rule(estimator.confidence))
        _warn_if_unsure(run, curvature, selection)
    elif report_sharpness:  # nothing chooses by curvature: a small fixed sample, for the report's sharpness only
        estimator = GGN(samples=REPORT_SAMPLES)
        with run.stage("curvature_report"):
            curvature = estimator.measure(run)
            curvature.stop = "report only"
    training_size = training_set_size(run.data.train, run.adapter.split)
    measured = _measurements(run, layers, curvature, gradient, training_size)
    objective = _validation_objective(run, update, selection)

    def inputs_for(names: list[str], masks: dict[str, Tensor] | None = None) -> UpdateInputs:
        return UpdateInputs(
            run.model,
            names,
            masks,
            gradient,
            objective,
            curvature,
            hvp_scale=training_size / max(curvature.samples, 1) if curvature is not None else math.nan,
            damping=run.curvature.damping,
            run=run,
        )

    trials, margin, selection_fields, masks, start = None, None, {}, None, {}
    if selection.trials:  # the rule runs the update on each candidate and keeps the best
        guard = HarmGuard.start(run, objective, [])  # the validation objective per sample, before (None: guard off)
        with run.stage("selection"):
            selected, names, outcome, trials = select_by_trial(
                selection, update, layers, measured, objective, inputs_for, run.processes
            )
        with run.stage("update"), trainable_only(run.model, names):
            _check_finite(run, outcome, names, objective, read_validation=True)
    else:
        with run.stage("selection"):
            chosen, margin = _select(run, selection, layers, measured, curvature)
            selected, selection_fields, masks = chosen.layers, chosen.report_fields, chosen.masks
            names = [n for layer in selected for n in layers[layer] if masks is None or n in masks]
        guard = HarmGuard.start(run, objective, names)  # before the update; the layers below the selection run once
        if update.needs_forget_gradient and gradient is None:  # back-propagated only as deep as the selection
            with run.stage("forget_gradient"), trainable_only(run.model, names):
                gradient = run.forget_gradient()
        start = _selected(run.model, names)
        with run.stage("update"), trainable_only(run.model, names):
            outcome = UpdateResult.of(update.apply(inputs_for(names, masks)))
            _check_finite(run, outcome, names, objective, read_validation=update.validation() is not None)
    guarded = guard.check(run, update, outcome) if guard is not None else None  # raises on a harmful update
    if start:  # the selected parameters before the update: did it move them?
        params = dict(run.model.named_parameters())
        moved = any(not torch.equal(params[n], value) for n, value in start.items())
    else:  # trial selection restored the start between trials: judge by the winner's step
        moved = outcome.tau != 0
    unchanged = unchanged_model(outcome.tau, bool(outcome.tau_search), moved, update.name)
    if unchanged is not None:
        rank_zero_warn(unchanged)
    evaluate("after")
    run.seconds["total"] = time.perf_counter() - total_start
    run.seconds["unlearning"] = sum(run.seconds.get(stage, 0.0) for stage in UNLEARNING_STAGES)
    run.seconds["reporting"] = run.seconds["total"] - run.seconds["unlearning"]
    fields: dict[str, Any] = {}
    for evaluation, stages in results.items():
        for name, value in evaluation.report_fields(stages).items():
            fields[name] = {**fields.get(name, {}), **value} if name == "evaluations" else value
    uses_validation = outcome.tau_search or update.validation() is not None and outcome.tau is None
    return UnlearningReport(
        layer_sharpness=measured.sharpness or {},
        selected_layers=selected,
        num_updated_parameters=_count_updated(run.model, names, masks),
        tau=outcome.tau,
        seconds=run.seconds,
        update=update.name,
        selection=selection.name,
        curvature=estimator.name if curvature is not None else None,
        curvature_samples=curvature.samples if curvature is not None else 0,
        curvature_stop=curvature.stop if curvature is not None else None,
        curvature_notes=list(curvature.notes) if curvature is not None else [],
        tau_search=outcome.tau_search,
        validation_source=objective.source if uses_validation and objective is not None else None,
        validation_samples=outcome.validation_samples,
        update_steps=outcome.steps,
        update_details=outcome.details,
        granularity=selection.granularity,
        newton_decrement=_decrement(measured) or {},
        sharpness_standard_error=measured.standard_errors or {},
        selection_margin=margin,
        solver=outcome.solver,
        fallback=outcome.fallback,
        update_fields=outcome.report_fields,
        selection_fields=selection_fields,
        selection_trials=trials,
        harm_guard=guarded.to_dict() if guarded is not None else None,
        sample_passes=_summed_passes(run),
        **fields,
    )


def _summed_passes(run: UnlearningRun) -> dict[str, dict[str, float]]:
    """``run.passes`` summed over the processes (every process ran the same stages, so the keys agree)."""
    stages = sorted(set(run.seconds) | {"outside"})
    sums = SummedState()
    table = sums.add_state("passes", (len(stages), len(PASS_KINDS)))
    for row, stage in enumerate(stages):
        table[row] = torch.tensor([run.passes.get(stage, {}).get(k, 0.0) for k in PASS_KINDS], dtype=torch.float64)
    sums.sync(run.processes)
    counts = sums.state["passes"].tolist()
    summed = {s: {k: n for k, n in zip(PASS_KINDS, row) if n} for s, row in zip(stages, counts)}
    return {s: kinds for s, kinds in summed.items() if kinds}


def _measurements(
    run: UnlearningRun,
    layers: dict[str, list[str]],
    result: CurvatureResult | None,
    gradient: dict[str, Tensor] | None,
    training_size: int,
) -> Measurements:
    """What the run measured before selecting: what a selection rule reads."""
    measured = Measurements(run.model, layers, gradient=gradient)
    if result is None:
        return measured
    measured.sharpness = layer_sharpness(run.model, result.diagonal)
    measured.standard_errors = result.statistics.standard_errors()
    measured.diagonal = result.diagonal
    measured.diagonal_sum = {
        name: d * training_size for name, d in result.diagonal.items()
    }  # H of the SUM loss (eq. 2)
    measured.damping = run.curvature.damping
    return measured


def _select(
    run: UnlearningRun,
    selection: Selection,
    layers: dict[str, list[str]],
    measured: Measurements,
    result: CurvatureResult | None,
) -> tuple[Selected, dict[str, Any] | None]:
    """Apply the rule to what was measured, the same in every process; returns the choice and its margin."""
    chosen = run.processes.broadcast(run.processes.agree(lambda: selection.select(measured)))
    if not isinstance(chosen, Selected):
        chosen = Selected(list(chosen))
    names = list(layers)
    if (
        not chosen.layers
        or any(n not in layers for n in chosen.layers)
        or len(set(chosen.layers)) != len(chosen.layers)
    ):
        raise ValueError(
            f"the selection returned {chosen.layers}, which must be a non-empty list of distinct names from {names}."
        )
    margin = None
    if chosen.masks is None and result is not None:
        margin = selection_margin(measured.sharpness, result.statistics, chosen.layers, selection.name)
    unsure = margin is not None and margin["lead_in_standard_errors"] < 2  # NaN (one batch): no estimate
    if unsure and result.stop in ("fixed count", "data exhausted"):  # a sequential pass has warned already
        rank_zero_warn(
            f"the selected layer {margin['selected']!r} leads the runner-up {margin['runner_up']!r} by "
            f"{margin['lead']:.3g}, only {margin['lead_in_standard_errors']:.2f} standard errors of the "
            f"curvature estimate ({run.curvature.name}, {result.samples} samples): another sample could "
            "select the other layer. Raise the curvature's samples (or num_probes / labels_per_example)."
        )
    return chosen, margin


def _warn_if_unsure(run: UnlearningRun, result: CurvatureResult, selection: Selection) -> None:
    confident = selection.stopping_rule(run.curvature.confidence)
    if result.stop != "maximum reached" or confident is None or confident(result.statistics) or run.max_samples:
        return  # (fast_dev_run caps the samples: a short pass is what was asked for)
    margin, detail = selection.lead(result.statistics), ""
    if margin is not None and math.isfinite(margin["lead_in_standard_errors"]):  # say by how much the pick leads
        detail = (
            f" (the selected layer {margin['selected']!r} leads the runner-up {margin['runner_up']!r} by "
            f"{margin['lead_in_standard_errors']:.2f} standard errors, short of {run.curvature.confidence:g})"
        )
    rank_zero_warn(
        f"curvature read its maximum of {result.samples} samples before the selection's stopping rule was met"
        f"{detail}. Another sample could select another layer; raise the curvature's max_samples, or accept the "
        "choice."
    )


def _validation_objective(run: UnlearningRun, update: Update, selection: Selection) -> ValidationObjective | None:
    """The validation objective, chosen once for every reader: the step-size search, trial selection, the guard
    (None when none of them reads one, or the data has no validation set)."""
    spec = update.validation() or (ValidationSpec() if selection.trials or run.harm_guard else None)
    if spec is None:
        return None
    return choose_validation(run, spec.samples, with_relabelled_forget=spec.objective == "validation_and_forget")


def _check_finite(
    run: UnlearningRun,
    outcome: UpdateResult,
    names: list[str],
    objective: ValidationObjective | None,
    read_validation: bool,
) -> None:
    """Finite selected parameters, and a finite loss on a few hundred validation samples if the update or the
    selection read validation data (else on the forget set, which the update read anyway).

    A step-size search that measured the validation objective at the final weights (``objective_after``, on
    its own subset) has that value checked instead of a new pass.
    """
    after = outcome.objective_after
    validation = read_validation and objective is not None
    sample = objective.sample if validation else run.forget
    if after is None:
        after = run.mean_loss(run.model, list(limit_samples(sample, FINITE_CHECK_SAMPLES)))
    params = dict(run.model.named_parameters())
    finite = all(torch.isfinite(params[n]).all() for n in names)
    bad = non_finite_samples(sample) if finite and not math.isfinite(after) and sample is not None else 0
    if bad:  # the harm guard (when on) finds such data before the update; without it, only on failure
        data = f"validation data ({objective.source})" if validation else "forget set"
        raise ValueError(
            f"the loss on the {data} is not finite, and {bad} of its samples hold{'s' * (bad == 1)} NaN or infinite "
            "values: the data is at fault, not the update (no step makes the loss on such inputs finite). Fix or drop "
            "those samples; the weights were restored."
        )
    if not finite or not math.isfinite(after):
        raise RuntimeError(
            f"the update made the model non-finite (loss {after}); the weights were restored. "
            "Lower the step size, lr or steps, raise the curvature's damping, or check the forget loss."
        )


def _decrement(measured: Measurements) -> dict[str, float] | None:
    if measured.gradient is None or measured.diagonal_sum is None:
        return None
    return newton_decrement(measured.model, measured.gradient, measured.diagonal_sum, measured.damping)


def _selected(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Copies of the selected parameters (to tell whether the update moved them)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _count_updated(model: nn.Module, names: list[str], masks: dict[str, Tensor] | None) -> int:
    params = dict(model.named_parameters())
    return sum(int(masks[n].sum()) if masks and n in masks else params[n].numel() for n in names)
