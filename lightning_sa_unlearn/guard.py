"""The harm guard: an update that makes the validation objective worse beyond noise is undone.

After the update the guard measures the validation objective again, on the same samples, and
compares it with its value before. When the layers are selected before it starts, the outputs of the
frozen layers below the selection are stored by the first pass and the second runs the layers above
only (:class:`~lightning_sa_unlearn.updates.cached_features.StoredFeatures`; the whole model again if
anything below changed). Noise is :func:`paired_standard_error`: the standard error of
the mean of the per-sample loss differences (after − before). Pairing cancels what the samples
have in common, so the test sees a small systematic rise that an unpaired comparison would miss.

Rules (``rise`` = objective after − objective before, ``se`` = its paired standard error):

* with a corrected set (or any run that is not sample deletion): ``rise > 2·se`` is harm: the
  weights are restored and :class:`HarmfulUpdateError` says what to change;
* sample deletion (no ``corrected_dataloader()``): forgetting real training samples may
  legitimately cost some validation loss, so a rise beyond ``2·se`` only warns; the update is
  refused only when the rise is beyond ``4·se`` *and* beyond 10% of the objective before;
* in both cases, a class whose validation accuracy falls by more than 5 points is named in a warning.

A rise below ``1e-6`` of the objective (rounding) never counts. The objective is the one the update's
step size reads (validation loss, plus the relabelled forget loss for ``objective="validation_and_forget"``);
updates that read no validation data are judged on the mean validation loss: ``val_dataloader()``, or else
a slice of ``retain_dataloader()`` (as :class:`~lightning_sa_unlearn.updates.ValidatedStep` does). With
neither, the guard warns and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sa_unlearn.data import limit_samples
from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode

if TYPE_CHECKING:
    from lightning_sa_unlearn.pipeline import UnlearningRun
    from lightning_sa_unlearn.updates import Update
    from lightning_sa_unlearn.updates.cached_features import StoredFeatures

HARM_STANDARD_ERRORS = 2.0
"""A rise of the validation objective beyond this many paired standard errors is harm."""
DELETION_STANDARD_ERRORS = 4.0
DELETION_RELATIVE_RISE = 0.10
"""Sample deletion: refused only beyond 4 standard errors and beyond 10% of the objective before."""
CLASS_ACCURACY_DROP = 0.05
"""A class whose validation accuracy falls by more than this (5 points) is named in a warning."""
ROUNDING = 1e-6
"""Relative rises below this are rounding, never harm."""
GUARD_SAMPLES = 2048
"""Validation samples (a seeded random subset) the guard compares before and after: a paired test is sensitive
with a few thousand, and the whole set would cost more than the unlearning it checks."""
RETAIN_SAMPLES = 5000
"""Retain samples that stand in for a missing ``val_dataloader()`` (as in :class:`ValidationSpec`)."""


class HarmfulUpdateError(RuntimeError):
    """The update made the validation objective worse beyond noise; the weights were restored."""


def standard_error(count: float, total: float, squares: float) -> float:
    """Standard error of a mean from ``(n, Σx, Σx²)`` (sums that add up across processes); NaN for n < 2."""
    if count < 2:
        return float("nan")
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1)
    return math.sqrt(variance / count)


def paired_standard_error(before: Tensor, after: Tensor) -> float:
    """Standard error of ``mean(after − before)`` over samples measured twice, in the same order.

    ``before`` and ``after`` hold one value per sample (e.g. per-sample losses before and after an
    update). NaN with fewer than two samples.
    """
    if before.shape != after.shape:
        raise ValueError(f"paired values need the same shape, got {tuple(before.shape)} and {tuple(after.shape)}.")
    difference = after.double() - before.double()
    return standard_error(difference.numel(), float(difference.sum()), float(difference.square().sum()))


def per_sample_loss(loss_fn: LossFn, logits: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn`` on each sample of a batch (``loss_fn`` returns the mean over the batch); with positions
    (pixels, tokens), cross-entropy gives one loss per position, which the caller averages per sample."""
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(logits, targets, reduction="none")
    try:
        return torch.func.vmap(lambda z, t: loss_fn(z.unsqueeze(0), t.unsqueeze(0)))(logits, targets)
    except Exception:  # a loss that vmap cannot trace: one call per sample (cheap: no forward pass)
        return torch.stack([loss_fn(logits[i : i + 1], targets[i : i + 1]) for i in range(len(targets))])


@dataclass
class SampleLosses:
    """Per-sample losses (float64), labels and predicted classes of this process's samples, in order."""

    losses: Tensor
    labels: Tensor
    predicted: Tensor


@torch.no_grad()
def sample_losses(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> SampleLosses:
    """:class:`SampleLosses` of ``model`` on every sample of ``batches``, in eval mode (on the CPU)."""
    losses, labels, predicted = [], [], []
    with eval_mode(model):
        for x, y in batches_for(model, batches):
            logits = model(x)
            valid = (y >= 0).reshape(len(y), -1)  # negative labels are padding the loss ignores
            per = per_sample_loss(loss_fn, logits, y).detach().double().reshape(len(y), -1)
            if per.shape == valid.shape:  # one loss per position: the mean over the positions not ignored
                per = (per * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
            losses.append(per.mean(1).cpu())
            labels.append(y.reshape(-1)[valid.reshape(-1)].cpu())
            predicted.append(logits.argmax(dim=1).reshape(-1)[valid.reshape(-1)].cpu())
    if not losses:
        empty = torch.empty(0, dtype=torch.long)
        return SampleLosses(torch.empty(0, dtype=torch.float64), empty, empty)
    return SampleLosses(torch.cat(losses), torch.cat(labels), torch.cat(predicted))


@dataclass
class GuardResult:
    """What the guard measured: the objective before and after, the rise and its paired standard error."""

    before: float
    after: float
    standard_error: float
    samples: int
    paired: bool
    class_accuracy: dict[int, tuple[float, float]]
    source: str = ""
    warnings: list[str] = field(default_factory=list)
    stored_below: str | None = None
    """The last frozen module whose outputs were stored and reused after the update (None: whole model twice)."""

    @property
    def rise(self) -> float:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        """The report's ``harm_guard`` field."""
        return {
            "source": self.source,
            "before": self.before,
            "after": self.after,
            "rise": self.rise,
            "standard_error": self.standard_error,
            "rise_in_standard_errors": self.standard_errors,
            "samples": self.samples,
            "paired": self.paired,
            "warnings": list(self.warnings),
            "stored_below": self.stored_below,
        }

    @property
    def standard_errors(self) -> float:
        """The rise in standard errors (inf for a rise with no spread at all)."""
        if self.standard_error > 0:
            return self.rise / self.standard_error
        return math.inf if self.rise > 0 else 0.0


class HarmGuard:
    """Measures the validation objective per sample before an update, and judges the update after it.

    Use :meth:`start` before ``update.apply(run)`` and :meth:`check` after it; the caller restores
    the weights when :meth:`check` raises.
    """

    def __init__(self, parts: list[tuple[str, Iterable[Any]]], source: str) -> None:
        self.parts, self.source = parts, source
        self.before: list[SampleLosses] = []
        self.features: StoredFeatures | None = None
        """With the layers already selected, the outputs of the frozen layers below them, stored by the first pass."""
        self.stored: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(parts)

    @classmethod
    def start(cls, run: UnlearningRun, update: Update) -> HarmGuard | None:
        """The guard with the objective measured before the update; None when off or without validation data."""
        if not run.harm_guard:
            return None
        parts, source = _validation_parts(run)
        if not parts:
            rank_zero_warn(
                "the harm guard is skipped: there is no validation data (neither val_dataloader() nor "
                "retain_dataloader()), so nothing checks that the update did not make the model worse. "
                "Define val_dataloader() to have the update checked."
            )
            return None
        guard = cls(parts, source)
        with run.stage("harm_guard"):
            if run.names:  # selected already: the layers below the selection need to run only once
                from lightning_sa_unlearn.updates.cached_features import StoredFeatures

                guard.features = StoredFeatures.find(run.model, run.names, parts[0][1], run.count)
            guard.before = guard._measure(run, store=True)
        return guard

    def check(self, run: UnlearningRun, update: Update, outcome: dict[str, Any] | None = None) -> GuardResult:
        """Judge the update (see the module's rules): warn, or raise :class:`HarmfulUpdateError`."""
        with run.stage("harm_guard"):
            result = self._compare(run, self._measure(run))
        result.source = self.source
        if self.features is not None and any(s is not None for s in self.stored) and self.features.current():
            result.stored_below = self.features.path
        deletion = run.data.corrected is None
        tolerance = ROUNDING * max(abs(result.before), 1e-12)
        se = result.standard_error if math.isfinite(result.standard_error) else 0.0
        noise = HARM_STANDARD_ERRORS * se + tolerance
        refused = result.rise > noise
        if deletion:
            refused = result.rise > max(DELETION_STANDARD_ERRORS * se, DELETION_RELATIVE_RISE * abs(result.before))
            refused = refused and result.rise > tolerance
        summary = (
            f"the {update.name} update raised the validation objective ({self.source}) from {result.before:.4g} to "
            f"{result.after:.4g}: +{result.rise:.3g}, {result.standard_errors:.1f} standard errors of the "
            f"{'paired per-sample' if result.paired else 'unpaired'} difference over {result.samples} samples"
        )
        if refused:
            limit = (
                f"beyond {DELETION_STANDARD_ERRORS:g} standard errors and {DELETION_RELATIVE_RISE:.0%} of the "
                "objective (the sample-deletion limit)"
                if deletion
                else f"beyond {HARM_STANDARD_ERRORS:g} standard errors"
            )
            raise HarmfulUpdateError(
                f"{summary}, {limit}. The weights were restored. {advice(update, outcome or {})} "
                "To keep such an update anyway, pass harm_guard=False."
            )
        if deletion and result.rise > noise:
            result.warnings.append(
                f"{summary}. Kept: without a corrected set, forgetting may cost some validation loss; the guard "
                f"refuses only a rise beyond {DELETION_STANDARD_ERRORS:g} standard errors and "
                f"{DELETION_RELATIVE_RISE:.0%} of the objective."
            )
        fallen = {k: v for k, v in result.class_accuracy.items() if v[0] - v[1] > CLASS_ACCURACY_DROP}
        if fallen:
            classes = ", ".join(f"class {k} {100 * b:.1f}% -> {100 * a:.1f}%" for k, (b, a) in sorted(fallen.items()))
            result.warnings.append(
                f"the {update.name} update lowered the validation accuracy of some classes by more than "
                f"{100 * CLASS_ACCURACY_DROP:.0f} points ({classes}; {self.source}). Check the per-class "
                "held-out accuracy in the report."
            )
        for warning in result.warnings:
            rank_zero_warn(warning)
        return result

    # ------------------------------------------------------------------ internals
    def _measure(self, run: UnlearningRun, store: bool = False) -> list[SampleLosses]:
        """Per-sample losses of every part; through the stored features while the layers below are unchanged."""

        def measure() -> list[SampleLosses]:
            parts = [part for _, part in self.parts]
            if self.features is None:
                return [sample_losses(run.model, part, run.loss_fn) for part in parts]
            if store:
                self.stored = [self.features.store(part) for part in parts]
            return self.features.losses(parts, self.stored, run.loss_fn)

        return run.processes.agree(measure)

    def _compare(self, run: UnlearningRun, after: list[SampleLosses]) -> GuardResult:
        classes = max(run.num_classes, 1)
        rows = []  # per part: paired n, Σd, Σd², then n, Σ, Σ² before and after, and a mismatch flag
        for b, a in zip(self.before, after):
            same = b.labels.shape == a.labels.shape and torch.equal(b.labels, a.labels)
            d = a.losses - b.losses if same else torch.zeros(0, dtype=torch.float64)
            rows.append(
                [
                    d.numel(),
                    float(d.sum()),
                    float(d.square().sum()),
                    b.losses.numel(),
                    float(b.losses.sum()),
                    float(b.losses.square().sum()),
                    a.losses.numel(),
                    float(a.losses.sum()),
                    float(a.losses.square().sum()),
                    float(not same),
                ]
            )
        counts = []  # validation part only: per class, correct before, correct after, support before, after
        first_before, first_after = self.before[0], after[0]
        for state in (first_before, first_after):
            correct = state.labels[state.predicted == state.labels]
            counts.append(torch.bincount(_classes(correct, classes), minlength=classes)[:classes])
        for state in (first_before, first_after):
            counts.append(torch.bincount(_classes(state.labels, classes), minlength=classes)[:classes])
        local = torch.cat([torch.tensor(rows, dtype=torch.float64).reshape(-1), torch.cat(counts).double()])
        total = run.processes.sum(local).cpu()
        table = total[: 10 * len(rows)].reshape(len(rows), 10).tolist()
        paired = all(row[9] == 0 for row in table)
        before = after_value = 0.0
        variance = 0.0
        samples = 0
        for n_d, s_d, q_d, n_b, s_b, q_b, n_a, s_a, q_a, _ in table:
            before += s_b / max(n_b, 1)
            after_value += s_a / max(n_a, 1)
            if paired:
                se = standard_error(n_d, s_d, q_d)
            else:  # the passes served different samples: an unpaired comparison
                se = math.sqrt(standard_error(n_b, s_b, q_b) ** 2 + standard_error(n_a, s_a, q_a) ** 2)
            variance += se * se if math.isfinite(se) else 0.0
            samples += int(n_b)
        correct_b, correct_a, support_b, support_a = total[10 * len(rows) :].reshape(4, classes).tolist()
        accuracy = {
            k: (correct_b[k] / support_b[k], correct_a[k] / support_a[k])
            for k in range(classes)
            if support_b[k] > 0 and support_a[k] > 0
        }
        return GuardResult(before, after_value, math.sqrt(variance), samples, paired, accuracy)


def _classes(labels: Tensor, classes: int) -> Tensor:
    """Labels as bincount input (out-of-range labels were refused earlier; clamp keeps bincount safe)."""
    return labels.long().clamp(0, classes - 1)


def _validation_parts(run: UnlearningRun) -> tuple[list[tuple[str, Iterable[Any]]], str]:
    """The data of the objective: the update's own validation data, or else val_dataloader or a retain slice."""
    share = math.ceil(GUARD_SAMPLES / run.processes.world_size)
    if run.validation_sample is not None:  # a random subset: the paired test needs few samples
        parts: list[tuple[str, Iterable[Any]]] = [("validation", list(limit_samples(run.validation_sample, share)))]
        if run.relabelled is not None:
            parts.append(("forget inputs with corrected labels", run.relabelled))
        return parts, run.validation_source or "validation"
    if run.validation is not None:
        parts = [("validation", run.validation)]
        if run.relabelled is not None:
            parts.append(("forget inputs with corrected labels", run.relabelled))
        return parts, run.validation_source or "validation"
    data = run.data
    if data.val is not None:
        return [("validation", list(limit_samples(run.shuffled(data.val, "validation"), share)))], "val_dataloader"
    if data.retain is not None:
        retain = run.shuffled(data.retain, "retain", RETAIN_SAMPLES)
        return [("validation", list(limit_samples(retain, share)))], "retain slice"
    return [], ""


def advice(update: Update, outcome: dict[str, Any]) -> str:
    """What to change, for the built-in updates (a generic hint for others)."""
    from lightning_sa_unlearn.updates import (
        FineTune,
        FirstOrder,
        FixedStep,
        ForgetLossDescent,
        SecondOrder,
        ValidatedStep,
    )

    hints: list[str] = []
    solver = outcome.get("solver") or {}
    if solver.get("status") == "max_iterations":
        hints.append(
            f"The {solver.get('name')} solve stopped at max_iterations with relative residual "
            f"{solver.get('relative_residual', float('nan')):.3g}: raise the solver's max_iterations or the "
            "curvature's damping."
        )
    if isinstance(update, (FirstOrder, SecondOrder)):
        step = update.step_size
        if isinstance(step, FixedStep):
            hints.append(
                f"Lower the fixed step (tau={step.tau:g}), or let it be chosen on validation (step_size=None)."
            )
        elif isinstance(step, ValidatedStep) and step.grid is not None and 0.0 not in step.grid:
            hints.append(f"Add 0 (no update) to the step-size grid {step.grid}, or use the default grid (grid=None).")
        else:
            hints.append("Use a smaller step size.")
    elif isinstance(update, FineTune):
        hints.append(f"Lower FineTune's lr ({update.lr:g}) or epochs ({update.epochs}).")
    elif isinstance(update, ForgetLossDescent):
        hints.append(
            f"Lower ForgetLossDescent's lr ({update.lr:g}) or steps ({update.steps}); with val_dataloader() it "
            "also stops at its best step."
        )
    else:
        hints.append(f"Make {type(update).__name__}'s step smaller.")
    return " ".join(hints)
