"""Selection rules as parts: which layers (or entries) the update may move (paper section 4.1).

A rule gets :class:`Measurements`, everything the run measured before selecting, and returns
:class:`Selected`. A rule that compares no layers (``LastLayer``, ``AllLayers``, ``Layers``) needs
no curvature, and the run then measures none unless the user configured an estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_sa_unlearn.selection.functional import (
    entry_decrement,
    newton_decrement,
    select_layers,
    selection_margin,
    top_fraction,
)

StoppingRule = Callable[[Any], bool]
"""When a sequential curvature pass may stop: a test on its running per-layer statistics
(:class:`~lightning_sa_unlearn.curvature.SharpnessStatistics`: ``means()``, ``difference_standard_error(a, b)``)."""


@dataclass
class Measurements:
    """What the run knows when it selects. Fields no part asked for are None.

    ``diagonal`` is ``diag H`` of the mean training loss; ``diagonal_sum`` is it times the training-set
    size N (the SUM loss of eq. 2, the scale of the forget gradient); ``gradient`` is ``∇L_forget`` (eq. 7).
    """

    model: nn.Module
    layers: dict[str, list[str]]
    """``{module path: [parameter names]}`` of every module that owns trainable parameters, in order."""
    sharpness: dict[str, float] | None = None
    standard_errors: dict[str, float] | None = None
    diagonal: dict[str, Tensor] | None = None
    diagonal_sum: dict[str, Tensor] | None = None
    gradient: dict[str, Tensor] | None = None
    damping: float = 0.0
    """λ of ``H + λI`` (the curvature part's)."""

    def require(self, what: str, rule: object) -> None:
        if getattr(self, what) is None:
            raise ValueError(f"{rule!r} needs the {what}, which this run did not measure.")


@dataclass
class Selected:
    """Module paths to update and, for entry-level rules, boolean masks per parameter name."""

    layers: list[str]
    masks: dict[str, Tensor] | None = None
    report_fields: dict[str, Any] = field(default_factory=dict)
    """A custom rule's own fields, by their own names: the report's ``selection_fields``."""


class Selection:
    """Base class: ``select(measurements) -> Selected`` (or a list of module paths)."""

    needs_curvature: ClassVar[bool] = False
    needs_forget_gradient: ClassVar[bool] = False
    granularity: ClassVar[str] = "layer"
    trials: ClassVar[bool] = False
    """A declared capability: True for a rule that chooses by trial updates. The pipeline then calls
    :meth:`candidates`, not :meth:`select`, runs the update on each from the same weights and keeps the one
    with the least validation objective (:class:`ValidatedLayer`)."""

    @property
    def name(self) -> str | list[str]:
        """The name in the report."""
        return type(self).__name__

    def select(self, measured: Measurements) -> Selected | list[str]:
        """The layers to update (a rule with ``trials = True`` implements :meth:`candidates` instead)."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(measurements).")

    def candidates(self, measured: Measurements) -> list[list[str]]:
        """The layer sets a trial rule tries (``trials = True``)."""
        raise NotImplementedError(f"{type(self).__name__} declares trials = True but does not give candidates().")

    def check(self, layers: Sequence[str]) -> None:
        """Fail before any work when the rule cannot apply to a model with these layers."""

    def stopping_rule(self, confidence: float) -> StoppingRule | None:
        """When the curvature pass has read enough for this rule, given the estimator's ``confidence`` (in
        standard errors); None (default): the rule does not rank the curvature, and the estimator reads its
        fixed count."""
        return None

    def lead(self, statistics: Any) -> dict[str, Any] | None:
        """By how much this rule's pick on the curvature ``statistics`` leads the runner-up
        (:func:`~lightning_sa_unlearn.selection.selection_margin`); None: the rule does not rank the curvature."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class CountedRule(Selection):
    """A rule that picks ``num_layers`` layers by its ``rule`` of :func:`select_layers`."""

    rule: ClassVar[str]

    def __init__(self, num_layers: int = 1) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        self.num_layers = num_layers

    @property
    def name(self) -> str:
        return self.rule

    def check(self, layers: Sequence[str]) -> None:
        select_layers(dict.fromkeys(layers, 0.0), self.rule, self.num_layers)


class RankingRule(CountedRule):
    """Picks the ``num_layers`` layers with the smallest (or largest) per-layer score."""

    largest: ClassVar[bool] = False

    def scores(self, measured: Measurements) -> dict[str, float]:
        measured.require("sharpness", self)
        return measured.sharpness

    def entry_scores(self, measured: Measurements) -> dict[str, Tensor]:
        """One score per parameter entry, for :class:`TopFraction`."""
        measured.require("diagonal", self)
        return measured.diagonal

    def select(self, measured: Measurements) -> Selected:
        return Selected(select_layers(self.scores(measured), self.rule, self.num_layers))


class SharpnessRanking(RankingRule):
    """A rule that ranks the per-layer sharpness: the curvature pass may stop once the pick is sure."""

    needs_curvature = True

    def stopping_rule(self, confidence: float) -> StoppingRule:
        """Stop when the last picked layer leads the runner-up by ``confidence`` standard errors of their
        difference (always, when every layer is picked)."""

        def confident(statistics: Any) -> bool:
            margin = self.lead(statistics)
            return margin is None or margin["lead_in_standard_errors"] >= confidence

        return confident

    def lead(self, statistics: Any) -> dict[str, Any] | None:
        means = statistics.means()
        return selection_margin(means, statistics, select_layers(means, self.rule, self.num_layers), self.rule)


class Flattest(SharpnessRanking):
    """The smallest mean Hessian diagonal ``s_l = (1/|θ_l|) Σ_{i∈θ_l} H_ii`` (section 4.1, Figure 1)."""

    rule = "flattest"
    needs_curvature = True


class Sharpest(SharpnessRanking):
    """The largest mean Hessian diagonal (the paper's abstract and section 5.1)."""

    rule = "sharpest"
    largest = True
    needs_curvature = True


class NewtonDecrement(RankingRule):
    """The largest predicted decrease of the forget loss, ``(1/|θ_l|) Σ_i g_i² / (H_ii + λ)``.

    ``g = ∇L_forget`` (eq. 7), ``H`` the diagonal of the SUM training loss (eq. 2), λ = ``damping`` (None:
    the curvature part's ``damping``, where it was set before this argument existed).
    """

    rule = "newton_decrement"
    largest = True
    needs_curvature = True
    needs_forget_gradient = True

    def __init__(self, num_layers: int = 1, damping: float | None = None) -> None:
        super().__init__(num_layers)
        if damping is not None and not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}; it is the λ of (H + λI).")
        self.damping = damping

    def _damping(self, measured: Measurements) -> float:
        return measured.damping if self.damping is None else self.damping

    def scores(self, measured: Measurements) -> dict[str, float]:
        measured.require("gradient", self)
        measured.require("diagonal_sum", self)
        return newton_decrement(measured.model, measured.gradient, measured.diagonal_sum, self._damping(measured))

    def entry_scores(self, measured: Measurements) -> dict[str, Tensor]:
        measured.require("gradient", self)
        measured.require("diagonal_sum", self)
        return entry_decrement(measured.gradient, measured.diagonal_sum, self._damping(measured))


class LastLayer(CountedRule):
    """The last ``num_layers`` layers in registration order (Warnecke et al.'s baseline)."""

    rule = "last"

    def select(self, measured: Measurements) -> Selected:
        return Selected(select_layers(dict.fromkeys(measured.layers, 0.0), "last", self.num_layers))


class AllLayers(Selection):
    """Every layer that owns trainable parameters."""

    @property
    def name(self) -> str:
        return "all"

    def select(self, measured: Measurements) -> Selected:
        return Selected(list(measured.layers))


class Layers(Selection):
    """Exactly the named module paths."""

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str) or not list(names):
            raise ValueError(f"Layers needs a non-empty list of module paths, got {names!r}.")
        self.names = list(names)

    @property
    def name(self) -> list[str]:
        return list(self.names)

    def select(self, measured: Measurements) -> Selected:
        return Selected(select_layers(dict.fromkeys(measured.layers, 0.0), self.names))

    def check(self, layers: Sequence[str]) -> None:
        select_layers(dict.fromkeys(layers, 0.0), self.names)


class TopFraction(Selection):
    """The ``fraction`` of single entries, model-wide, that ``rule`` ranks first; the rest stay bitwise identical.

    ``TopFraction(Flattest(), fraction=0.1)``: the 10% of entries with the smallest ``H_ii``.
    """

    granularity = "parameter"

    def __init__(self, rule: RankingRule, fraction: float = 0.1) -> None:
        if not isinstance(rule, RankingRule):
            raise ValueError(
                f"TopFraction ranks single entries, which {rule!r} cannot do; wrap Flattest(), Sharpest() "
                "or NewtonDecrement()."
            )
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
        self.rule, self.fraction = rule, fraction

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def needs_curvature(self) -> bool:  # type: ignore[override]
        return self.rule.needs_curvature

    @property
    def needs_forget_gradient(self) -> bool:  # type: ignore[override]
        return self.rule.needs_forget_gradient

    def select(self, measured: Measurements) -> Selected:
        masks = top_fraction(self.rule.entry_scores(measured), self.fraction, largest=self.rule.largest)
        layers = [layer for layer, owned in measured.layers.items() if any(n in masks for n in owned)]
        return Selected(layers, masks)


class ValidatedLayer(Selection):
    """Curvature proposes, validation decides: the ``k`` flattest layers plus the last are each updated
    on a trial, and the one whose update leaves the least validation objective is kept.

    Candidates are layers with a weight matrix or kernel (``Linear``, ``Conv``); normalisation and
    other affine layers only with ``include_norms=True``. Each trial runs the configured update,
    with its own step-size search, from the same weights; its objective is that of the step size
    (validation loss, plus the forget term for ``objective="validation_and_forget"``), on the first
    ``judge_samples`` of a seeded random validation order. Ties go to the candidate with fewer
    parameters. The curvature pass and the forget gradient are shared; the run costs about ``k + 1``
    single-layer updates. The report lists every trial (``selection_trials``).
    """

    needs_curvature = True
    needs_forget_gradient = True
    trials = True

    def __init__(self, k: int = 2, include_last: bool = True, include_norms: bool = False, judge_samples: int = 2048):
        if k < 0 or (k == 0 and not include_last) or judge_samples < 1:
            raise ValueError(f"ValidatedLayer needs k >= 0 (with include_last if 0) and judge_samples >= 1; got {k}.")
        self.k, self.include_last, self.include_norms, self.judge_samples = (
            k,
            include_last,
            include_norms,
            judge_samples,
        )

    @property
    def name(self) -> str:
        return "validated_layer"

    def candidates(self, measured: Measurements) -> list[list[str]]:
        """Single-layer candidates: the ``k`` flattest eligible layers, then the last eligible one."""
        modules = dict(measured.model.named_modules())
        eligible = [
            layer
            for layer in measured.layers
            if self.include_norms or isinstance(modules[layer], (nn.Linear, nn.modules.conv._ConvNd))
        ] or list(measured.layers)
        measured.require("sharpness", self)
        flattest = sorted(eligible, key=measured.sharpness.__getitem__)[: self.k]
        chosen = flattest + ([eligible[-1]] if self.include_last and eligible[-1] not in flattest else [])
        return [[layer] for layer in chosen]


SELECTIONS = {
    "flattest": Flattest,
    "sharpest": Sharpest,
    "last": LastLayer,
    "all": AllLayers,
    "newton_decrement": NewtonDecrement,
    "validated_layer": ValidatedLayer,
}


class SharpnessFunction(Selection):
    """A rule from a function of the per-layer sharpness, ``function({module path: s_l}) -> [module paths]`` (what a
    callback subclass's deprecated ``select_layers`` override becomes)."""

    needs_curvature = True

    def __init__(self, function: Callable[[dict[str, float]], Sequence[str]], name: str | list[str] = "custom") -> None:
        self.function, self._name = function, name

    @property
    def name(self) -> str | list[str]:
        return self._name

    def select(self, measured: Measurements) -> list[str]:
        return list(self.function(measured.sharpness))
