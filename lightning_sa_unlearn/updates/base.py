"""The update part and its step-size policy.

An :class:`Update` moves the selected parameters ``θ_S`` and returns what the report records. It
declares what it needs from the run (curvature, the forget gradient, the retain set, validation
data) so that the run computes nothing else and fails before any work when data is missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from lightning_sa_unlearn.updates.functional import _copy, _reset, apply_first_order, choose_tau
from lightning_sa_unlearn.updates.step_search import search_tau

if TYPE_CHECKING:
    from lightning_sa_unlearn.curvature.confidence import CurvatureResult
    from lightning_sa_unlearn.objective import ValidationObjective
    from lightning_sa_unlearn.run_context import RunContext

Objective = Literal["validation", "validation_and_forget"]
OBJECTIVES = ("validation", "validation_and_forget")


@dataclass(frozen=True)
class ValidationSpec:
    """What a validated choice minimises, and how many retain samples stand in for a missing ``val_dataloader()``.

    ``"validation"``: the mean validation loss. ``"validation_and_forget"``: that plus the mean loss of
    ``D_f``'s inputs under ``D̃_f``'s labels; clean validation data cannot see a backdoor trigger, this can.
    """

    objective: Objective = "validation"
    samples: int = 5000

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.samples < 1:
            raise ValueError(f"validation_samples must be >= 1, got {self.samples}.")


@dataclass
class UpdateResult:
    """What an update did: the report's update fields, and what the harm guard's advice reads."""

    tau: float | None = None
    """The step size τ of a step update (None: the update has no single step size)."""
    tau_search: list[Any] = field(default_factory=list)
    """``(τ, validation objective)`` for each τ the step-size search tried."""
    validation_samples: int | None = None
    objective_after: float | None = None
    """The validation objective at the final weights, when the update measured it (the finite check reuses it)."""
    steps: int | None = None
    details: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    fallback: str | None = None
    report_fields: dict[str, Any] = field(default_factory=dict)
    """A custom update's own fields, by their own names: the report's ``update_fields``."""

    @classmethod
    def of(cls, value: UpdateResult | Mapping[str, Any] | None) -> UpdateResult:
        """A result from what ``apply`` returned: a result, or a dict whose unknown keys become ``report_fields``."""
        if isinstance(value, UpdateResult):
            return value
        rest = dict(value or {})
        known = {f.name for f in fields(cls)} - {"report_fields"}
        return cls(**{key: rest.pop(key) for key in list(rest) if key in known}, report_fields=rest)


@dataclass(frozen=True)
class UpdateInputs:
    """What an update reads. The pipeline fills every field before :meth:`Update.apply`; nothing here changes
    while the update runs, and the update writes nothing back but the weights of ``names``.

    ``gradient`` is ``∇L_forget`` (eq. 7, SUM reduction, summed over processes) when the update declares
    ``needs_forget_gradient``; ``curvature`` (with ``hvp_scale = N / n`` and the curvature part's ``damping``)
    when it declares ``needs_curvature``; ``objective`` when :meth:`Update.validation` asks for one (None also
    when the data offers no validation set). ``run`` gives the data and settings (:class:`RunContext`).
    """

    model: nn.Module
    names: list[str]
    """The selected parameters' names: the update moves these alone (under ``masks``)."""
    masks: dict[str, Tensor] | None
    """Entry masks of entry-level selections (None: whole parameters)."""
    gradient: dict[str, Tensor] | None
    objective: ValidationObjective | None
    curvature: CurvatureResult | None
    hvp_scale: float
    """``N / n``: Hessian-vector products on the ``n`` curvature samples, rescaled to the SUM loss over ``N``."""
    damping: float
    """The curvature part's λ: the fallback of an update's own ``damping``."""
    run: RunContext

    def __getattr__(self, name: str) -> Any:
        """Parts written for ``apply(run)`` (before 0.3) reach the run's data and settings here, with a warning."""
        if name.startswith("__") or name == "run":
            raise AttributeError(name)
        moved = {"curvature_result": "curvature", "validation_loss": "objective", "validation": "objective"}
        if name in moved:
            raise AttributeError(f"UpdateInputs has no {name!r}: read inputs.{moved[name]} (see CHANGELOG 0.3.0).")
        value = getattr(self.run, name)
        warnings.warn(
            f"Update.apply receives UpdateInputs, not the run: read inputs.run.{name} (see CHANGELOG 0.3.0).",
            DeprecationWarning,
            stacklevel=2,
        )
        return value


class StepSize:
    """How far an update moves along its direction: ``θ_S ← θ_S − τ·d``."""

    def validation(self) -> ValidationSpec | None:
        """The validation data this policy reads (None: none)."""
        return None

    def advice(self) -> str:
        """What to change when the harm guard refused a step of this size."""
        return "Use a smaller step size."

    def apply(
        self, inputs: UpdateInputs, direction: dict[str, Tensor], default_grid: Sequence[float]
    ) -> dict[str, Any]:
        """Move ``inputs.names`` to ``θ_S − τ·direction``; return ``{"tau": ..., ...}`` for the report."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class FixedStep(StepSize):
    """A fixed ``τ >= 0``."""

    def __init__(self, tau: float) -> None:
        if not tau >= 0:  # NaN fails too
            raise ValueError(f"tau must be a number >= 0, got {tau!r}.")
        self.tau = float(tau)

    def apply(
        self, inputs: UpdateInputs, direction: dict[str, Tensor], default_grid: Sequence[float]
    ) -> dict[str, Any]:
        apply_first_order(inputs.model, direction, inputs.names, self.tau, inputs.masks)
        return {"tau": self.tau}

    def advice(self) -> str:
        return f"Lower the fixed step (tau={self.tau:g}), or let it be chosen on validation (step_size=None)."


class ValidatedStep(StepSize):
    """τ chosen on validation data (never the test set), with τ = 0 (no update) always a candidate.

    ``search="golden"`` (default): a golden-section search on ``log τ`` over the range of the grid
    (:mod:`~lightning_sa_unlearn.updates.step_search`), with ``evaluations`` forward passes over a
    random validation subset of ``first_samples`` samples, which doubles while the chosen step's gain
    over τ = 0 is within ``z`` standard errors. ``search="grid"``: every τ of the grid on the whole
    validation set, the least objective wins (the behaviour before version 0.2; one pass per grid value).

    Args:
        search: ``"golden"`` or ``"grid"``.
        grid: the τ values (default: the update's own, e.g. :func:`default_tau_grid`); its positive
            range bounds the golden-section search.
        objective: ``"validation"`` or ``"validation_and_forget"`` (:class:`ValidationSpec`).
        validation_samples: retain samples used as validation when there is no ``val_dataloader()``.
        first_samples, evaluations, z: the golden search's first subset, its number of points, and the
            noise threshold in standard errors of the paired loss difference.
    """

    def __init__(
        self,
        search: Literal["golden", "grid"] = "golden",
        grid: list[float] | None = None,
        objective: Objective = "validation",
        validation_samples: int = 5000,
        first_samples: int = 512,
        evaluations: int = 6,
        z: float = 2.0,
    ) -> None:
        if search not in ("golden", "grid"):
            raise ValueError(f"search must be 'golden' or 'grid', got {search!r}.")
        if grid is not None and (not list(grid) or not all(t >= 0 for t in grid)):
            raise ValueError(f"grid must be a non-empty list of numbers >= 0, got {grid!r}.")
        if first_samples < 1 or evaluations < 1 or not z >= 0:
            raise ValueError(
                f"first_samples and evaluations must be >= 1 and z >= 0, got {first_samples}, {evaluations}, {z}."
            )
        self.search, self.grid = search, None if grid is None else [float(t) for t in grid]
        self.spec = ValidationSpec(objective, validation_samples)
        self.first_samples, self.evaluations, self.z = first_samples, evaluations, z

    def advice(self) -> str:
        if self.grid is not None and 0.0 not in self.grid:
            return f"Add 0 (no update) to the step-size grid {self.grid}, or use the default grid (grid=None)."
        return super().advice()

    def validation(self) -> ValidationSpec:
        return self.spec

    def apply(
        self, inputs: UpdateInputs, direction: dict[str, Tensor], default_grid: Sequence[float]
    ) -> dict[str, Any]:
        objective = inputs.objective
        if objective is None:
            raise ValueError(
                "ValidatedStep needs a validation set: define val_dataloader() or retain_dataloader(), "
                "or use FixedStep(tau)."
            )
        grid = self.grid or list(default_grid)
        if self.search == "golden":
            return self._golden(inputs, objective, direction, grid)
        tau, losses = choose_tau(
            inputs.model,
            direction,
            inputs.names,
            grid,
            objective,
            progress=lambda it: inputs.run.progress(it, "choosing tau", len(grid)),
            masks=inputs.masks,
        )
        return {"tau": tau, "tau_search": sorted(losses.items()), "objective_after": losses.get(tau)}

    def _golden(
        self, inputs: UpdateInputs, objective: ValidationObjective, direction: dict[str, Tensor], grid: Sequence[float]
    ) -> dict[str, Any]:
        params = dict(inputs.model.named_parameters())
        start = _copy(params, inputs.names)

        def move(tau: float) -> None:
            _reset(params, start)
            apply_first_order(inputs.model, direction, inputs.names, tau, inputs.masks)

        tau, losses, used = search_tau(
            inputs.model,
            inputs.names,
            objective,
            move,
            grid,
            record=inputs.run.count,
            first_samples=self.first_samples,
            max_samples=objective.max_samples or 10**12,
            evaluations=self.evaluations,
            z=self.z,
        )
        move(tau)
        return {
            "tau": tau,
            "tau_search": sorted(losses.items()),
            "validation_samples": used,
            "objective_after": losses.get(tau),
        }


def step_size_from(value: StepSize | float | None) -> StepSize:
    """None: :class:`ValidatedStep`; a number: :class:`FixedStep`."""
    if value is None:
        return ValidatedStep()
    if isinstance(value, StepSize):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return FixedStep(value)
    raise ValueError(f"step_size must be a StepSize, a number (a fixed tau) or None (ValidatedStep()), got {value!r}.")


class Update:
    """Base class: ``apply(inputs)`` moves ``inputs.names`` (under ``inputs.masks``) and returns a result."""

    name: ClassVar[str] = "custom"
    needs_curvature: ClassVar[bool] = False
    needs_forget_gradient: ClassVar[bool] = True
    needs_retain: ClassVar[bool] = False

    def validation(self) -> ValidationSpec | None:
        """The validation data the update reads (None: none)."""
        return None

    def check(self, run: RunContext) -> None:
        """Fail before any work when the data contract lacks what this update needs."""
        data = run.data
        if self.needs_retain and data.retain is None:
            raise ValueError(
                f"{type(self).__name__} needs the retain set: define retain_dataloader() on your datamodule "
                "or LightningModule, or use FirstOrder()."
            )
        spec = self.validation()
        if spec is not None and spec.objective == "validation_and_forget" and data.corrected is None:
            raise ValueError(
                "objective='validation_and_forget' scores the forget inputs with their corrected labels, "
                "so it needs corrected_dataloader(); use objective='validation' for sample unlearning."
            )

    def apply(self, inputs: UpdateInputs) -> UpdateResult | dict[str, Any]:
        """Move ``inputs.names`` (under ``inputs.masks``); return an :class:`UpdateResult` (or a dict of its fields,
        where keys it does not know become ``report_fields``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(inputs).")

    def advice(self, result: UpdateResult) -> str:
        """What to change when the harm guard refused this update (``result``: what it reported)."""
        return f"Make {type(self).__name__}'s step smaller."

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
