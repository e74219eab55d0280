"""The second-order update of Warnecke et al. on the selected parameters (paper eq. 12).

``θ_S ← θ_S − (H_SS + λI)⁻¹ ∇_S L_forget``, with ``H`` the Hessian of the SUM learning loss
(eq. 2) at θ*, solved matrix-free from Hessian-vector products on the training data:

* :func:`conjugate_gradient` (default): exact in at most dim(S) steps for a positive definite
  ``H_SS + λI``; it stops with ``reason="negative curvature"`` if it meets a direction where the
  matrix is not positive definite.
* :func:`lissa`: the Neumann series of Warnecke et al.'s LiSSA, ``u ← g + u − (H + λI)u / s``,
  returning ``u / s``; it converges when ``s`` exceeds the largest eigenvalue of ``H + λI``
  (by default ``s`` is 1.1× a power-iteration estimate of it).

Vectors are dicts ``{parameter name: tensor}`` over the selected parameters; an optional mask per
parameter restricts the solve to the masked entries (``P (H + λI) P``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from lightning_sa_unlearn.curvature.second_derivatives import _twice_differentiable
from lightning_sa_unlearn.functional import LossFn, batch_size, batches_for, eval_mode, model_buffers

Vector = dict[str, Tensor]
MatVec = Callable[[Vector], Vector]


@dataclass
class SolveResult:
    """``x ≈ A⁻¹ b`` with the iterations used and the final relative residual ``‖Ax − b‖ / ‖b‖``."""

    x: Vector
    iterations: int
    residual: float
    reason: str

    @property
    def ok(self) -> bool:
        """A finite answer that is closer to the solution than x = 0 was (residual below 1)."""
        return self.reason in ("converged", "max_iterations") and math.isfinite(self.residual) and self.residual < 1


def hessian_vector_product(
    model: nn.Module,
    batches: Iterable[Any],
    names: list[str],
    *,
    loss_fn: LossFn = F.cross_entropy,
    scale: float = 1.0,
    masks: dict[str, Tensor] | None = None,
    all_reduce: Callable[[Vector], Vector] = lambda v: v,
) -> MatVec:
    """``v ↦ scale · Σ_n ∇²_SS ℓ_n · v`` over every sample of ``batches`` (forward-over-reverse, in eval mode).

    ``scale`` turns a sum over a subsample into an estimate of the sum over all N training samples
    (``N / n``). ``all_reduce`` adds the products of several processes.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    selected = {name: params[name] for name in names}
    fixed = {name: p for name, p in params.items() if name not in selected}
    buffers = model_buffers(model)

    def matvec(vector: Vector) -> Vector:
        vector = project(vector, masks)
        total = {name: torch.zeros_like(p) for name, p in selected.items()}
        with eval_mode(model), torch.enable_grad(), _twice_differentiable(model):  # fused weight norm is not
            for x, y in batches_for(model, batches):

                def batch_loss(theta: Vector) -> Tensor:
                    logits = functional_call(model, ({**fixed, **theta}, buffers), (x,))
                    return loss_fn(logits, y) * batch_size(x)

                product = jvp(grad(batch_loss), (selected,), (vector,))[1]
                for name in total:
                    total[name] += product[name]
        return project({name: t * scale for name, t in all_reduce(total).items()}, masks)

    return matvec


def damped(matvec: MatVec, damping: float) -> MatVec:
    """``v ↦ (A + λI) v``."""
    return lambda v: {k: a + damping * v[k] for k, a in matvec(v).items()}


def project(vector: Vector, masks: dict[str, Tensor] | None) -> Vector:
    if masks is None:
        return vector
    return {k: v * masks[k] if k in masks else v for k, v in vector.items()}


def dot(a: Vector, b: Vector) -> Tensor:
    return sum((a[k].double() * b[k].double()).sum() for k in a)


def _axpy(alpha: float | Tensor, x: Vector, y: Vector) -> Vector:
    return {k: y[k] + alpha * x[k] for k in y}


def _relative_residual(matvec: MatVec, x: Vector, b: Vector, b_norm: float) -> float:
    ax = matvec(x)
    return float(torch.sqrt(dot(_axpy(-1.0, b, ax), _axpy(-1.0, b, ax)))) / b_norm


def conjugate_gradient(matvec: MatVec, b: Vector, *, max_iterations: int = 100, tolerance: float = 1e-6) -> SolveResult:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec`` (x₀ = 0)."""
    b_norm = float(torch.sqrt(dot(b, b)))
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    if b_norm == 0:
        return SolveResult(x, 0, 0.0, "converged")
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rr = dot(r, r)
    iterations, reason = 0, "max_iterations"
    for iterations in range(1, max_iterations + 1):
        ap = matvec(p)
        curvature = dot(p, ap)
        if not torch.isfinite(curvature):
            return SolveResult(x, iterations, float("inf"), "non-finite")
        if curvature <= 0:
            reason = "negative curvature"
            break
        alpha = (rr / curvature).to(next(iter(b.values())).dtype)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        if float(torch.sqrt(rr_new)) / b_norm <= tolerance:
            reason = "converged"
            break
        p = _axpy((rr_new / rr).to(alpha.dtype), p, r)
        rr = rr_new
    return SolveResult(x, iterations, _relative_residual(matvec, x, b, b_norm), reason)


def largest_eigenvalue(matvec: MatVec, like: Vector, *, iterations: int = 20, seed: int = 0) -> float:
    """Power-iteration estimate of the largest eigenvalue (in magnitude) of ``matvec``."""
    generator = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for k, t in like.items()}
    estimate = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(dot(v, v))
        if norm == 0:
            return 0.0
        v = {k: t / norm for k, t in v.items()}
        av = matvec(v)
        estimate = float(dot(v, av))
        v = av
    return abs(estimate)


def lissa(
    matvec: MatVec, b: Vector, *, scale: float, max_iterations: int = 1000, tolerance: float = 1e-6
) -> SolveResult:
    """LiSSA (Agarwal et al.; Warnecke et al.'s solver) with full-sample products: ``x = Σ_k (I − A/s)^k b / s``.

    The recursion ``u ← b + u − A u / s`` keeps ``u = s·x``; it converges when ``0 < A < s·I``.
    Stops when the relative residual ``‖A x − b‖/‖b‖ = ‖b − A u/s‖/‖b‖`` falls below ``tolerance``.
    """
    b_norm = float(torch.sqrt(dot(b, b)))
    u = {k: torch.zeros_like(v) for k, v in b.items()}
    if b_norm == 0:
        return SolveResult(u, 0, 0.0, "converged")
    iterations, reason, residual = 0, "max_iterations", 1.0
    for iterations in range(1, max_iterations + 1):
        step = _axpy(-1.0 / scale, matvec(u), b)  # b − A u / s = the residual of x = u / s
        residual = float(torch.sqrt(dot(step, step))) / b_norm
        if not math.isfinite(residual) or residual > 1e6:
            return SolveResult({k: v / scale for k, v in u.items()}, iterations, float("inf"), "diverged")
        if residual <= tolerance:
            reason = "converged"
            break
        u = {k: u[k] + step[k] for k in u}
    x = {k: v / scale for k, v in u.items()}
    return SolveResult(x, iterations, _relative_residual(matvec, x, b, b_norm), reason)
