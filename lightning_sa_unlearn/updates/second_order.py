"""The second-order update (paper eq. 12) and its solvers as parts."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_sa_unlearn.parts import resolve
from lightning_sa_unlearn.updates.base import (
    StepSize,
    Update,
    UpdateInputs,
    UpdateResult,
    ValidationSpec,
    step_size_from,
)
from lightning_sa_unlearn.updates.functional import default_tau_grid
from lightning_sa_unlearn.updates.solvers import (
    MatVec,
    SolveResult,
    Vector,
    conjugate_gradient,
    damped,
    hessian_vector_product,
    largest_eigenvalue,
    lissa,
    project,
)

SECOND_ORDER_TAUS = [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
"""Step sizes along the Newton direction that :class:`SecondOrder` searches by default (1 is eq. 12)."""


class Solver:
    """Base class: solve ``(H_SS + λI) x = b`` from matrix-vector products."""

    name: str = "custom"

    def __init__(self, max_iterations: int = 100, tolerance: float = 1e-6) -> None:
        if max_iterations < 1 or not tolerance > 0:
            raise ValueError(f"max_iterations must be >= 1 and tolerance > 0, got {max_iterations}, {tolerance}.")
        self.max_iterations, self.tolerance = max_iterations, tolerance

    def solve(self, matvec: MatVec, b: Vector, *, counted: MatVec, seed: int) -> tuple[SolveResult, dict[str, Any]]:
        """``(result, extra report fields)``; ``counted`` is ``matvec`` that also advances the progress display."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class CG(Solver):
    """Conjugate gradient: exact in at most dim(S) steps for a positive definite ``H_SS + λI``."""

    name = "cg"

    def solve(self, matvec: MatVec, b: Vector, *, counted: MatVec, seed: int) -> tuple[SolveResult, dict[str, Any]]:
        result = conjugate_gradient(counted, b, max_iterations=self.max_iterations, tolerance=self.tolerance)
        return result, {"lissa_scale": None}


class LiSSA(Solver):
    """The Neumann series ``u ← b + u − (H + λI)u / s``, returning ``u / s`` (Warnecke et al.).

    ``scale`` s must exceed the largest eigenvalue of ``H + λI`` (default: 1.1× a power iteration).
    """

    name = "lissa"

    def __init__(self, max_iterations: int = 100, tolerance: float = 1e-6, scale: float | None = None) -> None:
        super().__init__(max_iterations, tolerance)
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        self.scale = scale

    def solve(self, matvec: MatVec, b: Vector, *, counted: MatVec, seed: int) -> tuple[SolveResult, dict[str, Any]]:
        scale = self.scale or 1.1 * largest_eigenvalue(matvec, b, seed=seed)
        result = lissa(counted, b, scale=scale, max_iterations=self.max_iterations, tolerance=self.tolerance)
        return result, {"lissa_scale": scale}


SOLVERS = {"cg": CG, "lissa": LiSSA}


class SecondOrder(Update):
    """Paper eq. 12 on S: ``θ_S ← θ_S − τ·(H_SS + λI)⁻¹ ∇_S L_forget``; τ = 1 is eq. 12 exactly.

    ``H`` is the Hessian of the SUM training loss (eq. 2), from Hessian-vector products on the
    curvature part's samples, rescaled to the whole training set; λ is ``damping``.

    Args:
        step_size: default τ chosen on validation (:class:`ValidatedStep`), searched over the range of
            :data:`SECOND_ORDER_TAUS` (τ = 0 always a candidate).
        solver: ``"cg"``, ``"lissa"`` or a :class:`Solver` (default :class:`CG`).
        fallback: when the solve fails, apply the first-order update instead (the report says so);
            False raises, after the weights are restored.
        damping: λ of ``H + λI``. None: the curvature part's ``damping`` (where it was set before this
            argument existed; set it here).

    A solve that stops at the solver's ``max_iterations`` (closer to the solution than x = 0, not within
    ``tolerance``) is applied with a warning that names its residual, and only if the harm guard passes.
    """

    name = "second_order"
    needs_curvature = True

    def __init__(
        self,
        step_size: StepSize | float | None = None,
        solver: Solver | str | None = None,
        fallback: bool = False,
        damping: float | None = None,
    ) -> None:
        if damping is not None and not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}; it is the λ of (H + λI).")
        self.step_size = step_size_from(step_size)
        self.solver = resolve(solver or "cg", Solver, SOLVERS, "solver")
        self.fallback, self.damping = fallback, damping

    def validation(self) -> ValidationSpec | None:
        return self.step_size.validation()

    def advice(self, result: UpdateResult) -> str:
        solver = result.solver or {}
        hint = ""
        if solver.get("status") == "max_iterations":
            hint = (
                f"The {solver.get('name')} solve stopped at max_iterations with relative residual "
                f"{solver.get('relative_residual', float('nan')):.3g}: raise the solver's max_iterations or "
                "SecondOrder's damping. "
            )
        return hint + self.step_size.advice()

    def apply(self, inputs: UpdateInputs) -> dict[str, Any]:
        run = inputs.run
        product = hessian_vector_product(
            inputs.model,
            run.batches(run.data.train, "training", inputs.curvature.samples),  # the samples curvature read
            list(inputs.names),
            loss_fn=run.loss_fn,
            scale=inputs.hvp_scale,
            masks=inputs.masks,
            all_reduce=run.processes.sum_tree,
        )
        damping = inputs.damping if self.damping is None else self.damping
        matvec = damped(product, damping)
        b = project({name: inputs.gradient[name] for name in inputs.names}, inputs.masks)
        solver = self.solver
        iterations = iter(run.progress(range(solver.max_iterations), f"second order ({solver.name})", None))

        def counted(v: Vector) -> Vector:  # advances the progress display once per Hessian-vector product
            next(iterations, None)
            return matvec(v)

        result, extra = solver.solve(matvec, b, counted=counted, seed=run.seed)
        report = {
            "name": solver.name,
            "iterations": result.iterations,
            "relative_residual": result.residual,
            "status": result.reason,
            "damping": damping,
            "hvp_scale": inputs.hvp_scale,
            **extra,
        }
        if result.ok:
            if result.reason == "max_iterations":  # one rule for every solver
                guarded = "applied only if the harm guard passes" if run.harm_guard else "applied (harm_guard=False)"
                rank_zero_warn(
                    f"the {solver.name} solve stopped at max_iterations={solver.max_iterations} with relative "
                    f"residual {result.residual:.3g} (tolerance {solver.tolerance:g}): the step solves (H + λI)x = g "
                    f"only approximately; it is {guarded}. Raise max_iterations or the curvature's damping."
                )
            return {**self.step_size.apply(inputs, result.x, SECOND_ORDER_TAUS), "solver": report}
        message = (
            f"the {solver.name} solve failed ({result.reason}, relative residual {result.residual:.3g} "
            f"after {result.iterations} iterations)"
        )
        if not self.fallback:
            raise RuntimeError(
                f"{message}; the weights were restored. Raise the curvature's damping or max_iterations, use "
                "solver='cg', or pass fallback=True."
            )
        rank_zero_warn(f"{message}; applying the first-order update instead (fallback=True).")
        grid = default_tau_grid(inputs.model, inputs.gradient, inputs.names)
        first_order = self.step_size.apply(inputs, inputs.gradient, grid)
        return {**first_order, "solver": report, "fallback": f"{message}; applied first_order instead"}
