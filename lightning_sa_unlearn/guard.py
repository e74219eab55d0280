"""The harm guard: an update that makes the validation objective worse beyond noise is undone.

After the update the guard measures the validation objective again, on the same samples, and
compares it with its value before. When the layers are selected before it starts, the outputs of the
frozen layers below the selection are stored by the first pass and the second runs the layers above
only (:class:`~lightning_sa_unlearn.objective.stored_features.StoredFeatures`; the whole model again if
anything below changed). Noise is :func:`paired_standard_error`: the standard error of
the mean of the per-sample loss differences (after − before). Pairing cancels what the samples
have in common, so the test sees a small systematic rise that an unpaired comparison would miss.

Rules (``rise`` = objective after − objective before, ``se`` = its paired standard error):

* with a corrected set (or any run that is not sample deletion): ``rise > 2·se`` is harm: the
  weights are restored and :class:`HarmfulUpdateError` says what to change;
* sample deletion (no ``corrected_dataloader()``): forgetting real training samples may
  legitimately cost some validation loss, so a rise beyond ``2·se`` only warns; the update is
  refused only when the rise is beyond ``4·se`` *and* beyond 10% of the objective before;
* in both cases, damage on a few samples is refused too, although a rise that ``k`` samples carry is only about
  ``√k`` standard errors: a mean validation loss that more than doubles (``after > 2·before``, by more than
  0.01: a loss near 0 doubles by rounding), whatever its standard error; and a validation accuracy that falls
  by more than 3 paired standard errors of the per-sample correctness *and* by at least 0.5 points
  (correctness: 1 or 0 per sample; for per-position labels, the share of its positions predicted right).
  Both read the validation data alone, not the relabelled forget inputs the objective may add;
* in both cases, a class whose validation accuracy falls by more than 5 points is named in a warning only
  (correcting a flipped class legitimately moves the class it was flipped to).

A loss that is NaN or infinite before the update is the data's fault (the weights were checked finite at the
start of the run): the guard says so before any update.

A rise below ``1e-6`` of the objective (rounding) never counts. The objective is the one the update's
step size reads (validation loss, plus the relabelled forget loss for ``objective="validation_and_forget"``);
updates that read no validation data are judged on the mean validation loss. The data is the one the pipeline
chose for every reader: ``val_dataloader()``, or else 5,000 samples of ``retain_dataloader()``, in a seeded
random order. With neither, the guard warns and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sa_unlearn.objective import (  # noqa: F401 (re-exported: imports from guard keep working)
    SampleLosses,
    StoredFeatures,
    ValidationObjective,
    mean_change,
    paired_moments,
    paired_standard_error,
    per_sample_loss,
    sample_losses,
    standard_error,
)
from lightning_sa_unlearn.processes import SummedState
from lightning_sa_unlearn.updates.base import Update, UpdateResult

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext

HARM_STANDARD_ERRORS = 2.0
"""A rise of the validation objective beyond this many paired standard errors is harm."""
DELETION_STANDARD_ERRORS = 4.0
DELETION_RELATIVE_RISE = 0.10
"""Sample deletion: refused only beyond 4 standard errors and beyond 10% of the objective before."""
LOSS_RATIO = 2.0
"""A mean validation loss that ends above this multiple of its value before is harm, whatever its standard error."""
LOSS_RATIO_MIN_RISE = 0.01
"""... unless it rose by less than this (a loss near 0 multiplies by rounding)."""
ACCURACY_STANDARD_ERRORS = 3.0
"""A fall of validation accuracy beyond this many paired standard errors of the per-sample correctness is harm ..."""
ACCURACY_MIN_DROP = 0.005
"""... when the fall is also at least this (0.5 points): with thousands of samples, 3 standard errors are a few."""
CLASS_ACCURACY_DROP = 0.05
"""A class whose validation accuracy falls by more than this (5 points) is named in a warning."""
ROUNDING = 1e-6
"""Relative rises below this are rounding, never harm."""
GUARD_SAMPLES = 2048
"""Validation samples (a seeded random subset) the guard compares before and after: a paired test is sensitive
with a few thousand, and the whole set would cost more than the unlearning it checks."""


class HarmfulUpdateError(RuntimeError):
    """The update made the model worse on validation data beyond noise (see the rules); the weights were restored."""


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
    accuracy_before: float = math.nan
    accuracy_after: float = math.nan
    accuracy_standard_error: float = math.nan
    """Validation accuracy (mean per-sample correctness) before and after, and the standard error of its change."""
    validation_loss_before: float = math.nan
    validation_loss_after: float = math.nan
    """The mean loss of the validation data alone (the objective may add the relabelled forget inputs)."""
    fired: list[str] = field(default_factory=list)
    """The tests that fired on a kept update: ``"standard_errors"`` (a sample-deletion rise kept with a warning),
    ``"class_accuracy"`` (a warning). A refusal raises instead, its message naming each test that fired
    (``"standard_errors"``, ``"loss_doubled"``, ``"accuracy"``)."""

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
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "accuracy_standard_error": self.accuracy_standard_error,
            "validation_loss_before": self.validation_loss_before,
            "validation_loss_after": self.validation_loss_after,
            "fired": list(self.fired),
        }

    @property
    def standard_errors(self) -> float:
        """The rise in standard errors (inf for a rise with no spread at all)."""
        if self.standard_error > 0:
            return self.rise / self.standard_error
        return math.inf if self.rise > 0 else 0.0

    @property
    def loss_doubled(self) -> bool:
        """The validation loss ended above :data:`LOSS_RATIO` times its value before, by :data:`LOSS_RATIO_MIN_RISE`."""
        before, after = self.validation_loss_before, self.validation_loss_after
        return before >= 0 and after > LOSS_RATIO * before and after - before > LOSS_RATIO_MIN_RISE

    @property
    def accuracy_fell(self) -> bool:
        """Validation accuracy fell by :data:`ACCURACY_MIN_DROP` and beyond :data:`ACCURACY_STANDARD_ERRORS`."""
        fall = self.accuracy_before - self.accuracy_after
        se = self.accuracy_standard_error if math.isfinite(self.accuracy_standard_error) else 0.0
        return fall >= ACCURACY_MIN_DROP and fall > ACCURACY_STANDARD_ERRORS * se

    def summary(self, update: str) -> str:
        """The mean-loss test's numbers, for messages."""
        return (
            f"the {update} update raised the validation objective ({self.source}) from {self.before:.4g} to "
            f"{self.after:.4g}: +{self.rise:.3g}, {self.standard_errors:.1f} standard errors of the "
            f"{self.difference} difference over {self.samples} samples"
        )

    @property
    def difference(self) -> str:
        """What the standard errors are of, for messages."""
        return "paired per-sample" if self.paired else "unpaired"

    def concentrated(self) -> dict[str, str]:
        """The tests that see damage on a few samples, by name, with their numbers (those that fired)."""
        fired = {}
        if self.loss_doubled:
            before, after = _number(self.validation_loss_before), _number(self.validation_loss_after)
            fired["loss_doubled"] = f"the mean validation loss more than doubled ({before} → {after})"
        if self.accuracy_fell:
            fall = self.accuracy_before - self.accuracy_after
            spread = fall / self.accuracy_standard_error if self.accuracy_standard_error > 0 else math.inf
            fired["accuracy"] = (
                f"the validation accuracy fell from {100 * self.accuracy_before:.1f}% to "
                f"{100 * self.accuracy_after:.1f}% (−{100 * fall:.1f} points, {spread:.1f} "
                f"{'paired' if self.paired else 'unpaired'} standard errors of per-sample correctness)"
            )
        return fired


class HarmGuard:
    """Measures the validation objective per sample before an update, and judges the update after it.

    Use :meth:`start` before ``update.apply(inputs)`` and :meth:`check` after it; the caller restores
    the weights when :meth:`check` raises.
    """

    def __init__(self, parts: list[tuple[str, Iterable[Any]]], source: str) -> None:
        self.parts, self.source = parts, source
        self.before: list[SampleLosses] = []
        self.features: StoredFeatures | None = None
        """With the layers already selected, the outputs of the frozen layers below them, stored by the first pass."""
        self.stored: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(parts)

    @classmethod
    def start(cls, run: RunContext, objective: ValidationObjective | None, names: list[str]) -> HarmGuard | None:
        """The guard with the objective measured before the update of ``names`` (``[]``: not selected yet); None
        when off or without validation data."""
        if not run.harm_guard:
            return None
        parts, source = _validation_parts(objective, stored=bool(names))
        if not parts:
            rank_zero_warn(
                "the harm guard is skipped: there is no validation data (neither val_dataloader() nor "
                "retain_dataloader()), so nothing checks that the update did not make the model worse. "
                "Define val_dataloader() to have the update checked."
            )
            return None
        guard = cls(parts, source)
        with run.stage("harm_guard"):
            if names:  # selected already: the layers below the selection run once (their outputs are shared)
                batches, guard.features, guard.stored[0] = objective.stored(run.model, names, GUARD_SAMPLES, run.count)
                guard.parts[0] = ("validation", batches)
            guard.before = guard._measure(run, store=True)
        return guard

    def check(self, run: RunContext, update: Update, outcome: UpdateResult | None = None) -> GuardResult:
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
        limit = f"beyond {HARM_STANDARD_ERRORS:g} standard errors"
        if deletion:
            refused = result.rise > max(DELETION_STANDARD_ERRORS * se, DELETION_RELATIVE_RISE * abs(result.before))
            refused = refused and result.rise > tolerance
            limit = (
                f"beyond {DELETION_STANDARD_ERRORS:g} standard errors and {DELETION_RELATIVE_RISE:.0%} of the "
                "objective (the sample-deletion limit)"
            )
        summary = result.summary(update.name)
        reasons = {"standard_errors": f"{summary}, {limit}"} if refused else {}
        reasons.update(result.concentrated())
        if reasons:
            lead, spread = "", ""
            if not refused:  # the mean-loss test did not fire: say why it could not
                lead = f"the {update.name} update was refused by the harm guard ({self.source}): "
                spread = (
                    f"; the objective changed by {result.rise:+.3g} ({result.standard_errors:+.1f} standard errors "
                    f"of the {result.difference} difference over {result.samples} samples), which the mean-loss test "
                    "alone would keep: damage on a few samples is only a few standard errors"
                )
            raise HarmfulUpdateError(
                f"{lead}{'; '.join(reasons.values())}{spread}. The weights were restored. "
                f"{update.advice(outcome or UpdateResult())} To keep such an update anyway, pass harm_guard=False."
            )
        if deletion and result.rise > noise:
            result.fired.append("standard_errors")
            result.warnings.append(
                f"{summary}. Kept: without a corrected set, forgetting may cost some validation loss; the guard "
                f"refuses only a rise beyond {DELETION_STANDARD_ERRORS:g} standard errors and "
                f"{DELETION_RELATIVE_RISE:.0%} of the objective."
            )
        fallen = {k: v for k, v in result.class_accuracy.items() if v[0] - v[1] > CLASS_ACCURACY_DROP}
        if fallen:
            result.fired.append("class_accuracy")
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
    def _measure(self, run: RunContext, store: bool = False) -> list[SampleLosses]:
        """Per-sample losses of every part; through the stored features while the layers below are unchanged."""

        def measure() -> list[SampleLosses]:
            parts = [part for _, part in self.parts]
            if self.features is None:
                measured = [sample_losses(run.model, part, run.loss_fn) for part in parts]
            else:
                if store:  # the validation part's store may come from the objective already
                    self.stored = [s if s is not None else self.features.store(p) for p, s in zip(parts, self.stored)]
                measured = self.features.losses(parts, self.stored, run.loss_fn)
            if store:  # before the update, with weights checked finite: a loss that is not is the data's
                _require_finite(self.parts, measured, self.source)
            return measured

        return run.processes.agree(measure)

    def _compare(self, run: RunContext, after: list[SampleLosses]) -> GuardResult:
        classes = max(run.num_classes, 1)
        sums = SummedState()
        # per part, the moments of the losses (9), a mismatch flag, the moments of the correctness (9)
        moments = sums.add_state("moments", (len(after), 19))
        for row, (b, a) in enumerate(zip(self.before, after)):
            same = b.labels.shape == a.labels.shape and torch.equal(b.labels, a.labels)
            flag = float(not same)
            moments[row] = torch.tensor(
                [*paired_moments(b.losses, a.losses, same), flag, *paired_moments(b.correct, a.correct, same)],
                dtype=torch.float64,
            )
        # the validation part alone: per class, correct before, correct after, support before, after
        counts = sums.add_state("class_counts", (4, classes))
        for row, state in enumerate((self.before[0], after[0])):
            correct = state.labels[state.predicted == state.labels]
            counts[row] = torch.bincount(_classes(correct, classes), minlength=classes)[:classes]
            counts[row + 2] = torch.bincount(_classes(state.labels, classes), minlength=classes)[:classes]
        sums.sync(run.processes)
        table = sums.state["moments"].tolist()
        paired = all(row[9] == 0 for row in table)
        losses = [mean_change(row[:9], paired) for row in table]
        before, after_value = sum(b for b, _, _ in losses), sum(a for _, a, _ in losses)
        variance = sum(se * se for _, _, se in losses if math.isfinite(se))
        samples = int(sum(row[3] for row in table))
        correct_b, correct_a, support_b, support_a = sums.state["class_counts"].tolist()
        accuracy = {
            k: (correct_b[k] / support_b[k], correct_a[k] / support_a[k])
            for k in range(classes)
            if support_b[k] > 0 and support_a[k] > 0
        }
        accuracy_before, accuracy_after, accuracy_se = mean_change(table[0][10:], paired)  # the validation part
        return GuardResult(
            before,
            after_value,
            math.sqrt(variance),
            samples,
            paired,
            accuracy,
            accuracy_before=accuracy_before,
            accuracy_after=accuracy_after,
            accuracy_standard_error=accuracy_se,
            validation_loss_before=losses[0][0],
            validation_loss_after=losses[0][1],
        )


def _require_finite(parts: list[tuple[str, Iterable[Any]]], measured: list[SampleLosses], source: str) -> None:
    """Raise when a loss measured before the update is NaN or infinite: with finite weights, the data is at fault."""
    for (what, _), losses in zip(parts, measured):
        bad = int((~torch.isfinite(losses.losses)).sum())
        if bad:
            data = "the validation data" if what == "validation" else f"the {what}"
            raise ValueError(
                f"the loss on {bad} of {losses.losses.numel()} samples of {data} ({source}) is NaN or infinite "
                "before any update, with finite weights: the data is at fault, not the update. Check those samples "
                "for NaN or infinite values (e.g. a division by zero in a transform); the weights were left unchanged."
            )


def _number(value: float) -> str:
    """A loss for messages, to 3 significant digits: 0.219, 21,800, 3.2e+11."""
    rounded = float(f"{value:.3g}")
    return f"{rounded:,.0f}" if 1e3 <= abs(rounded) < 1e9 else f"{value:.3g}"


def _classes(labels: Tensor, classes: int) -> Tensor:
    """Labels as bincount input (out-of-range labels were refused earlier; clamp keeps bincount safe)."""
    return labels.long().clamp(0, classes - 1)


def _validation_parts(
    objective: ValidationObjective | None, stored: bool
) -> tuple[list[tuple[str, Iterable[Any]]], str]:
    """The data of the objective, as the pipeline chose it for every reader (none: ``[]``): a random subset of
    the validation data (the paired test needs few samples; ``stored``: left empty, the objective's store fills
    it), plus the relabelled forget inputs if the objective has them."""
    if objective is None:
        return [], ""
    parts: list[tuple[str, Iterable[Any]]] = [("validation", [] if stored else objective.subset(GUARD_SAMPLES))]
    if objective.relabelled is not None:
        parts.append(("forget inputs with corrected labels", objective.relabelled))
    return parts, objective.source
