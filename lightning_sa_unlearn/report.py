"""What an unlearning run did and measured: the report, its table, its JSON and its plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TABLE_LAYERS = 10
"""Layers :meth:`UnlearningReport.format_table` lists at most (besides the selected ones); the JSON has all."""
PLOT_CLASSES = 40
"""Classes the per-class accuracy panel shows at most (those whose accuracy changed most)."""
_FIGURE_WIDTH, _CLASS_HEIGHT = 7.0, 3.0  # inches
_CLASS = "accuracy_class_"


@dataclass
class UnlearningReport:
    """The outcome of one :class:`~lightning_sa_unlearn.SharpnessAwareUnlearning` run.

    ``heldout_*`` hold ``accuracy``, ``loss``, ``accuracy_class_<k>`` (and ``accuracy_other_classes``
    for a targeted attack) on the test set; ``forget_*`` hold accuracy on ``D_f``'s trained labels
    (``accuracy_trained_labels``) and on ``D̃_f``'s labels (``accuracy_corrected_labels``).
    ``seconds`` has one entry per stage. ``tau`` is None for updates that have no step size.
    """

    layer_sharpness: dict[str, float]
    selected_layers: list[str]
    num_updated_parameters: int
    tau: float | None
    heldout_before: dict[str, float] = field(default_factory=dict)
    heldout_after: dict[str, float] = field(default_factory=dict)
    forget_before: dict[str, float] = field(default_factory=dict)
    forget_after: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    update: str = "first_order"
    selection: str | list[str] = "flattest"
    curvature: str | None = "ggn"
    """The curvature estimator's name; None when no part needed curvature (e.g. ``LastLayer``)."""
    curvature_samples: int = 0
    curvature_stop: str | None = None
    """Why the curvature pass stopped reading: ``"confident"``, ``"maximum reached"``, ``"data exhausted"``,
    ``"fixed count"`` or ``"report only"`` (no part chose by curvature: a small sample for this report)."""
    curvature_notes: list[str] = field(default_factory=list)
    """What the curvature estimate is not: e.g. ``ggn`` on a model with smooth nonlinearities is the
    Gauss-Newton part of the Hessian only (:meth:`~lightning_sa_unlearn.curvature.Curvature.notes`)."""
    tau_search: list[tuple[float, float]] = field(default_factory=list)
    """``(τ, validation loss)`` for each τ the step-size search tried (:class:`ValidatedStep`)."""
    validation_source: str | None = None
    validation_samples: int | None = None
    """Validation samples the step-size search read (the golden search's final subset)."""
    update_steps: int | None = None
    """Steps the update took: optimizer steps of ``FineTune``; for ``ForgetLossDescent`` the gradient step kept."""
    update_details: dict[str, Any] | None = None
    """What the update read: ``FineTune``'s ``retain_samples`` and ``cached_below``, the last frozen
    module whose outputs it stored (None: every epoch ran the whole model)."""
    update_fields: dict[str, Any] = field(default_factory=dict)
    """Fields a custom update reported under its own names (:attr:`UpdateResult.report_fields`)."""
    selection_fields: dict[str, Any] = field(default_factory=dict)
    """Fields a custom selection reported under its own names (:attr:`Selected.report_fields`)."""
    granularity: str = "layer"
    newton_decrement: dict[str, float] = field(default_factory=dict)
    """Per-layer predicted decrease of the forget loss, Σ g²/(H_ii + λ) / |layer| (the ``newton_decrement`` rule)."""
    solver: dict[str, Any] | None = None
    """``second_order``: the solver's name, iterations, final relative residual and status."""
    fallback: str | None = None
    """Why the first-order step replaced the second-order update (``SecondOrder(fallback=True)``), when it did."""
    harm_guard: dict[str, Any] | None = None
    """The harm guard's check (:mod:`~lightning_sa_unlearn.guard`): the validation objective ``before`` and
    ``after``, the ``rise`` and its paired ``standard_error``, ``samples``, ``source``, the validation
    ``accuracy_before``/``accuracy_after`` with the ``accuracy_standard_error`` of their paired change, the mean
    ``validation_loss_before``/``validation_loss_after`` of the validation data alone, the tests that ``fired``
    on the kept update, and the ``warnings`` it gave (a kept rise under sample deletion, classes whose accuracy
    fell by more than 5 points). None when the guard was off or had no validation data."""
    sharpness_standard_error: dict[str, float] = field(default_factory=dict)
    """Standard error of each layer's sharpness over curvature batches (:mod:`~lightning_sa_unlearn.curvature`)."""
    selection_trials: list[dict[str, Any]] | None = None
    """``ValidatedLayer``: each candidate's layers, validation objective, τ, parameters, and which was chosen."""
    selection_margin: dict[str, Any] | None = None
    """``flattest``/``sharpest``: the runner-up layer and the selected layer's lead in standard errors."""
    membership_inference: dict[str, dict[str, float]] | None = None
    """``MembershipInference``: ``{"before": ..., "after": ...}`` of :func:`membership_inference`."""
    relearn: dict[str, Any] | None = None
    """``RelearnAttack``: the attack's settings and the held-out metrics after it."""
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Custom evaluations: ``{key: {stage: result}}``."""
    sample_passes: dict[str, dict[str, float]] = field(default_factory=dict)
    """Samples through the model per stage and kind of pass, over all processes (:mod:`~lightning_sa_unlearn.passes`):
    ``forward_backward``, ``forward``, and ``forward_above``/``forward_backward_above`` through the layers above
    stored outputs only. Curvature stages count their model calls; their cost per sample is higher (timed)."""
    unlearned_checkpoint: str | None = None
    """Where the unlearned model was saved (``checkpoint_path``, the checkpoint beside ``ModelCheckpoint``'s at the
    end of ``fit``, or ``sa-unlearn unlearn``'s output); None when it was not saved."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UnlearningReport:
        # JSON wrote NaN and infinity inside the metric dicts as null; top-level None (e.g. tau) stays None
        values = {k: _nan_for_none(v) if isinstance(v, dict) else v for k, v in values.items()}
        values["tau_search"] = [tuple(pair) for pair in values.get("tau_search", [])]
        if "fine_tune_steps" in values:  # the field's name before version 0.2
            values["update_steps"] = values.pop("fine_tune_steps")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> UnlearningReport:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(_finite_or_none(self.to_dict()), f, indent=2)

    def scalar_metrics(self, prefix: str = "unlearn") -> dict[str, float]:
        """Flat ``{prefix/group/name: value}`` for ``trainer.callback_metrics`` and loggers."""
        metrics: dict[str, float] = {}
        for group in ("heldout_before", "heldout_after", "forget_before", "forget_after", "seconds"):
            for name, value in getattr(self, group).items():
                metrics[f"{prefix}/{group}/{name}"] = float(value)
        for layer, value in self.layer_sharpness.items():
            metrics[f"{prefix}/sharpness/{layer or '<root>'}"] = float(value)
        for when, values in (self.membership_inference or {}).items():
            for name, value in values.items():
                metrics[f"{prefix}/mia_{when}/{name}"] = float(value)
        if self.relearn is not None:
            for name, value in self.relearn["heldout"].items():
                metrics[f"{prefix}/relearn/heldout/{name}"] = float(value)
            metrics[f"{prefix}/relearn/forget_accuracy_trained_labels"] = float(
                self.relearn["forget_accuracy_trained_labels"]
            )
        metrics[f"{prefix}/num_updated_parameters"] = float(self.num_updated_parameters)
        if self.tau is not None:
            metrics[f"{prefix}/tau"] = float(self.tau)
        return metrics

    def format_table(self) -> str:
        """A plain-text before/after table, the sharpness of :meth:`table_layers`, and the seconds per stage."""
        rows = [("held-out accuracy", "accuracy")]
        rows += [
            (f"  class {k[len('accuracy_class_') :]}", k)
            for k in self.heldout_before
            if k.startswith("accuracy_class_")
        ]
        if "accuracy_other_classes" in self.heldout_before:
            rows.append(("  other classes", "accuracy_other_classes"))
        if "attack_success_rate" in self.heldout_before:
            rows.append(("attack success rate (triggered)", "attack_success_rate"))
        rows.append(("held-out loss", "loss"))
        lines = [f"{'metric':<34}{'before':>10}{'after':>10}", "-" * 54]
        for label, key in rows:
            lines.append(f"{label:<34}{_pct(self.heldout_before, key):>10}{_pct(self.heldout_after, key):>10}")
        for key, label in (
            ("accuracy_trained_labels", "forget set, trained (wrong) labels"),
            ("accuracy_corrected_labels", "forget set, corrected labels"),
        ):
            if key in self.forget_before:
                lines.append(f"{label:<34}{_pct(self.forget_before, key):>10}{_pct(self.forget_after, key):>10}")
        if self.membership_inference:
            before, after = self.membership_inference["before"], self.membership_inference["after"]
            for key, label in (
                ("forget_non_member_rate", "forget set called non-member (MIA)"),
                ("attacker_auc", "  attacker AUC (retain vs test)"),
            ):
                lines.append(f"{label:<34}{_ratio(before[key]):>10}{_ratio(after[key]):>10}")
        if self.relearn:
            attacked = self.relearn["heldout"]
            lines += [
                "",
                f"relearning attack ({self.relearn['samples']} forget samples, {self.relearn['steps']} steps, "
                f"lr {self.relearn['lr']:g}), held-out after it:",
            ]
            for label, key in rows:
                if key in attacked and key != "loss":
                    lines.append(f"  {label.strip():<32}{_pct(attacked, key):>10}")
        if self.layer_sharpness:
            lines += [
                "",
                f"layer sharpness (mean Hessian diagonal, {self.curvature}, {self.curvature_samples} samples):",
            ]
        for note in self.curvature_notes:
            lines.append(f"  note: {note}")
        shown = self.table_layers()
        width = max([30, *(len(layer or "<root>") + 2 for layer in shown)])
        for layer in shown:
            mark = "  <- selected" if layer in self.selected_layers else ""
            error = self.sharpness_standard_error.get(layer)
            spread = f" ± {error:.1e}" if error is not None and math.isfinite(error) else ""
            lines.append(f"  {layer or '<root>':<{width}}{self.layer_sharpness[layer]:>12.4e}{spread:<10}{mark}")
        if len(shown) < len(self.layer_sharpness):
            lines.append(
                f"  … {len(self.layer_sharpness) - len(shown)} more layers: see the JSON report (layer_sharpness)"
            )
        if self.selection_margin is not None:
            margin = self.selection_margin
            lead = margin["lead_in_standard_errors"]
            lead_text = (
                f"{lead:.1f} standard errors"
                if math.isfinite(lead)
                else ("no error estimate (one batch)" if math.isnan(lead) else "no spread between batches")
            )
            lines.append(f"  lead over the runner-up {margin['runner_up']}: {lead_text}")
        tau, details = "n/a" if self.tau is None else f"{self.tau:.4g}", self.update_details or {}
        lr = f" at lr {details['lr']:g}" if "lr" in details else ""
        tuned = f", fine-tune ended at epoch {details['best_epoch']}{lr}" if "best_epoch" in details else ""
        lines += [
            "",
            f"update: {self.update}, selection: {self.selection}, tau: {tau}{tuned}, "
            f"parameters updated: {self.num_updated_parameters:,}",
            *self._guard_lines(),
            "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()),
        ]
        return "\n".join(lines)

    def table_layers(self, limit: int = TABLE_LAYERS) -> list[str]:
        """The layers :meth:`format_table` lists, in model order: all of them up to ``limit``; beyond, the
        selected layers and those ranked nearest to them in sharpness (the runner-up first)."""
        layers = list(self.layer_sharpness)
        if len(layers) <= limit:
            return layers
        ranked = sorted(layers, key=lambda layer: _nan_last(self.layer_sharpness[layer]))
        rank = {layer: i for i, layer in enumerate(ranked)}
        anchors = [rank[layer] for layer in self.selected_layers if layer in rank] or [0]  # none: the flattest
        runner_up = (self.selection_margin or {}).get("runner_up")

        def distance(layer: str) -> tuple[float, int]:
            nearest = min(abs(rank[layer] - anchor) for anchor in anchors)
            return (min(nearest, 0.5) if layer == runner_up else nearest, rank[layer])

        kept = set(sorted(layers, key=distance)[: max(limit, len(anchors))])
        return [layer for layer in layers if layer in kept]

    def _guard_lines(self) -> list[str]:
        guard = self.harm_guard
        if not guard:
            return []
        lines = [
            f"harm guard: validation objective ({guard['source']}) {guard['before']:.4g} -> {guard['after']:.4g} "
            f"({guard['rise']:+.3g}, {guard['rise_in_standard_errors']:+.1f} standard errors, "
            f"{guard['samples']} samples)"
        ]
        if guard.get("accuracy_before") is not None and math.isfinite(guard["accuracy_before"]):
            lines[0] += (
                f"; validation accuracy {100 * guard['accuracy_before']:.2f}% -> {100 * guard['accuracy_after']:.2f}%"
            )
        warnings = guard.get("warnings", [])
        if warnings:  # each was printed when it was raised: named here, not repeated
            fired = ", ".join(guard.get("fired", [])) or "see the JSON report"
            lines.append(
                f"  kept with {len(warnings)} warning{'s' * (len(warnings) > 1)} ({fired}; their text is in the JSON "
                "report's harm_guard.warnings)"
            )
        return lines

    def figures(self) -> dict[str, Figure]:
        """``{"sharpness": ..., "class_accuracy": ...}``: the panels of :meth:`plot` as separate figures, for
        loggers; ``class_accuracy`` only when the report has per-class held-out accuracy."""
        sharpness = _figure(_FIGURE_WIDTH, _sharpness_height(len(self.layer_sharpness)))
        figures = {"sharpness": sharpness}
        self._draw_sharpness(sharpness.subplots())
        if self._class_accuracy():
            figures["class_accuracy"] = _figure(_FIGURE_WIDTH, _CLASS_HEIGHT)
            self._draw_class_accuracy(figures["class_accuracy"].subplots())
        for fig in figures.values():
            fig.tight_layout()
        return figures

    def plot(self, path: str | os.PathLike) -> None:
        """One image at ``path``: per-layer sharpness with the selected layers highlighted (paper Figure 1,
        left) and, when measured, the per-class held-out accuracy before and after."""
        heights = [_sharpness_height(len(self.layer_sharpness))]
        if self._class_accuracy():
            heights.append(_CLASS_HEIGHT)
        fig = _figure(_FIGURE_WIDTH, sum(heights))
        axes = fig.subplots(len(heights), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        self._draw_sharpness(axes[0])
        if len(axes) > 1:
            self._draw_class_accuracy(axes[1])
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)

    def _draw_sharpness(self, ax: Axes) -> None:
        """Horizontal bars in model order, top to bottom, with standard errors; log scale when all are positive."""
        from matplotlib.patches import Patch
        from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

        layers = list(self.layer_sharpness)
        values = [float(self.layer_sharpness[layer]) for layer in layers]
        errors = [self.sharpness_standard_error.get(layer, math.nan) for layer in layers]
        errors = [e if e is not None and math.isfinite(e) and e >= 0 else math.nan for e in errors]
        selected = [layer for layer in layers if layer in self.selected_layers]
        errors_drawn = any(math.isfinite(e) for e in errors)
        ax.barh(
            range(len(layers)),
            values,
            xerr=errors if errors_drawn else None,
            color=["tab:red" if layer in selected else "tab:blue" for layer in layers],
            error_kw={"ecolor": "black", "capsize": 2, "elinewidth": 0.8},
        )
        ax.set_yticks(range(len(layers)), [layer or "<root>" for layer in layers], fontsize=8)
        ax.set_ylim(len(layers) - 0.5, -0.5)  # the model's first layer on top
        positive = [v for v in values if v > 0]
        if positive and len(positive) == sum(not math.isnan(v) for v in values):
            ax.set_xscale("log")  # labels at 1, 2, 5 × 10^k when the values span under two decades
            subs = (1.0,) if max(positive) > 100 * min(positive) else (1.0, 2.0, 5.0)
            ax.xaxis.set_major_locator(LogLocator(subs=subs))
            ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(NullFormatter())
        estimator = self.curvature or "no curvature estimator"
        ax.set_title(f"layer sharpness ({estimator}, {self.curvature_samples} samples); selection: {self.selection}")
        ax.set_xlabel(f"mean Hessian diagonal ({estimator})" + (" ± standard error" if errors_drawn else ""))
        if not layers:
            ax.text(0.5, 0.5, "no per-layer sharpness in this report", ha="center", transform=ax.transAxes)
            return
        names = ", ".join(layer or "<root>" for layer in selected[:3]) + (", …" if len(selected) > 3 else "")
        handles = [Patch(color="tab:red", label=f"selected: {names}"), Patch(color="tab:blue", label="other layers")]
        ax.legend(handles=handles if selected else handles[1:], fontsize=8, loc="best")

    def _class_accuracy(self) -> list[str]:
        """The ``accuracy_class_<k>`` keys of both ``heldout_before`` and ``heldout_after``, in the table's order."""
        return [k for k in self.heldout_before if k.startswith(_CLASS) and k in self.heldout_after]

    def _draw_class_accuracy(self, ax: Axes) -> None:
        """Grouped bars, before and after, per class; beyond :data:`PLOT_CLASSES`, the classes that moved most."""
        keys = self._class_accuracy()
        total = len(keys)
        if total > PLOT_CLASSES:
            moved = sorted(keys, key=lambda k: -abs(self.heldout_after[k] - self.heldout_before[k]))
            keys = [k for k in keys if k in set(moved[:PLOT_CLASSES])]
        for offset, (label, metrics, color) in enumerate(
            (("before", self.heldout_before, "tab:gray"), ("after", self.heldout_after, "tab:green"))
        ):
            positions = [i - 0.2 + 0.4 * offset for i in range(len(keys))]
            ax.bar(positions, [100 * metrics[k] for k in keys], width=0.4, color=color, label=label)
        ax.set_xticks(range(len(keys)), [k[len(_CLASS) :] for k in keys], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("held-out accuracy (%)")
        shown = f"{len(keys)} of {total} classes that changed most" if len(keys) < total else "class"
        ax.set_xlabel(shown)
        ax.set_title(
            f"held-out accuracy per class: {_pct(self.heldout_before, 'accuracy')} -> "
            f"{_pct(self.heldout_after, 'accuracy')} overall"
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, outside pyplot: no global backend change, nothing left open to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _sharpness_height(layers: int) -> float:
    return max(3.0, 0.25 * layers + 1.2)  # inches: about 0.25 per label, plus title and axis


def _nan_last(value: float) -> tuple[bool, float]:
    return (math.isnan(value), value)


def _pct(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" if key == "loss" else f"{100 * value:.2f}%"


def _ratio(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _nan_for_none(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_finite_or_none` inside a dict: null entries, at any depth, become NaN."""
    return {k: float("nan") if v is None else _nan_for_none(v) if isinstance(v, dict) else v for k, v in values.items()}


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
