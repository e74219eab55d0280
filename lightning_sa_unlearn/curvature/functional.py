"""Diagonal curvature of the training loss at the trained weights.

The paper (section 4.1, eq. 8 and the text after it) measures sharpness along each parameter by
the diagonal of ``H_learn(θ*)``, the Hessian of the learning loss (eq. 2). All estimators here
return the diagonal for the MEAN loss ``(1/N) Σ_n ℓ(h(x_n, θ), y_n)`` over every sample of
``batches``; multiply by N for the SUM loss of eq. 2 (the scale does not change any ranking).

Every estimator runs the model in eval mode (BatchNorm uses its running statistics, dropout is
off) and puts each module's mode back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

from lightning_sa_unlearn.curvature import ggn_fast
from lightning_sa_unlearn.functional import (
    LossFn,
    batches_for,
    chunks,
    eval_mode,
    model_buffers,
    require_trainable_parameters,
    stateless_logits,
    stateless_loss,
    tree_add_,
)

CURVATURE_METHODS = ("exact", "ggn", "mc_ggn", "hutchinson", "empirical_fisher")
EXACT_MAX_PARAMETERS = 50_000
"""``method="exact"`` costs one Hessian-vector product per parameter and per batch; above this it refuses."""


def hessian_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = F.cross_entropy,
    method: str = "ggn",
    num_probes: int = 10,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    exact_max_parameters: int = EXACT_MAX_PARAMETERS,
    num_samples: int = 1,
) -> dict[str, Tensor]:
    """Diagonal of the Hessian of the mean loss over ``batches``, one tensor per trainable parameter.

    Args:
        model: the trained network; only parameters with ``requires_grad`` get an entry.
        batches: any iterable of ``(x, y)`` pairs, for example a DataLoader.
        loss_fn: ``loss_fn(logits, y)`` returning the batch MEAN (torch's default reduction).
        method: ``"exact"``, ``"ggn"``, ``"hutchinson"`` or ``"empirical_fisher"``:

            * ``"exact"``: ``diag H`` from one Hessian-vector product per parameter (vmapped).
              A test reference for small models; refuses above ``exact_max_parameters``.
            * ``"ggn"``: the exact diagonal of the generalized Gauss-Newton matrix
              ``G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n``. For cross-entropy,
              ``diag G = (1/N) Σ_n Σ_c p_nc · (∇_θ ℓ(x_n, c))²``, from per-example gradients.
              For networks that are piecewise linear in each layer (ReLU, max-pool, eval-mode
              BatchNorm, dropout in eval) it EQUALS the Hessian diagonal; for smooth
              nonlinearities (tanh, GELU, ...) it is the positive semi-definite Gauss-Newton
              part of the Hessian.
            * ``"mc_ggn"``: an unbiased Monte-Carlo GGN diagonal from ``num_samples`` labels per
              example drawn from the model's own softmax (cross-entropy only), about two gradient
              passes per sample.
            * ``"hutchinson"``: the unbiased estimate ``E_z[z ⊙ Hz]`` with ``num_probes``
              Rademacher probes and forward-over-reverse Hessian-vector products. Any
              twice-differentiable model.
            * ``"empirical_fisher"``: ``(1/N) Σ_n (∇_θ ℓ(x_n, y_n))²`` at the given labels.
              Cheap and biased: not a curvature estimate away from a perfect fit.
        num_probes: probes per batch for ``"hutchinson"``.
        generator: random source of the Hutchinson probes and the ``mc_ggn`` labels.
        num_samples: sampled labels per example for ``"mc_ggn"``.
        chunk_size: examples (or probes, or basis vectors) vmapped at once; bounds memory.
        exact_max_parameters: the size limit of ``"exact"``.

    Returns:
        ``{name: diagonal}`` with each parameter's name and shape.
    """
    total, count = hessian_diagonal_sum(
        model,
        batches,
        loss_fn=loss_fn,
        method=method,
        num_probes=num_probes,
        generator=generator,
        chunk_size=chunk_size,
        exact_max_parameters=exact_max_parameters,
        num_samples=num_samples,
    )
    if total is None:
        raise ValueError("hessian_diagonal got no samples: `batches` is empty.")
    return {name: value / count for name, value in total.items()}


def hessian_diagonal_sum(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn = F.cross_entropy,
    method: str = "ggn",
    num_probes: int = 10,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    exact_max_parameters: int = EXACT_MAX_PARAMETERS,
    num_samples: int = 1,
    on_batch: Callable[[dict[str, Tensor], int], None] | None = None,
) -> tuple[dict[str, Tensor] | None, int]:
    """``(Σ_n diag ∇²ℓ_n, N)``: the unnormalised sum behind :func:`hessian_diagonal`, and the sample count.

    Sums from disjoint shards of the data add up, which is how several processes combine their
    work (``None`` when ``batches`` held no sample). ``on_batch(part, size)``, if given, sees each
    batch's own sum first (for standard errors: :class:`~lightning_sa_unlearn.curvature.SharpnessStatistics`).
    Other arguments as in :func:`hessian_diagonal`.
    """
    if method not in CURVATURE_METHODS:
        raise ValueError(f"unknown curvature method {method!r}; choose one of {CURVATURE_METHODS}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    params = require_trainable_parameters(model)
    if method == "exact":
        size = sum(p.numel() for p in params.values())
        if size > exact_max_parameters:
            raise ValueError(
                f"method='exact' needs one Hessian-vector product per parameter, and this model has "
                f"{size:,} trainable parameters, above the limit of {exact_max_parameters:,} "
                "(exact_max_parameters). Use method='ggn', which is exact for ReLU/max-pool "
                "networks, or method='hutchinson' for any model."
            )
    if method == "hutchinson" and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1 for method='hutchinson', got {num_probes}.")
    if method == "mc_ggn" and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 for method='mc_ggn', got {num_samples}.")
    per_batch = {
        "exact": _exact_batch,
        "ggn": _ggn_batch,
        "mc_ggn": _mc_ggn_batch,
        "hutchinson": _hutchinson_batch,
        "empirical_fisher": _empirical_fisher_batch,
    }[method]
    options = dict(
        loss_fn=loss_fn, num_probes=num_probes, num_samples=num_samples, generator=generator, chunk_size=chunk_size
    )
    return sum_over_batches(
        model, batches, lambda x, y, params, buffers: per_batch(model, params, buffers, x, y, **options), on_batch
    )


def sum_over_batches(
    model: nn.Module,
    batches: Iterable[Any],
    batch_sum: Callable[[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor]],
    on_batch: Callable[[dict[str, Tensor], int], None] | None = None,
) -> tuple[dict[str, Tensor] | None, int]:
    """``(Σ_batches batch_sum(x, y, params, buffers), N)`` in eval mode with gradients on; empty batches skipped.

    ``batch_sum`` returns ``Σ_{n ∈ batch} diag ∇²ℓ_n`` for the trainable ``params``; it is the one
    piece a new curvature estimator has to write (:class:`~lightning_sa_unlearn.curvature.Curvature`).
    """
    params = require_trainable_parameters(model)
    total: dict[str, Tensor] | None = None
    count = 0
    with eval_mode(model), torch.enable_grad():
        buffers = model_buffers(model)
        for x, y in batches_for(model, batches):
            if x.shape[0] == 0:
                continue
            part = batch_sum(x, y, params, buffers)
            if on_batch is not None:
                on_batch(part, x.shape[0])
            total = tree_add_(total, part)
            count += x.shape[0]
    return total, count


def _exact_batch(model, params, buffers, x, y, *, loss_fn, chunk_size, **_) -> dict[str, Tensor]:
    """Σ over the batch of ``diag ∇²ℓ``: column i of H is ``H e_i``; keep its i-th entry."""
    batch_loss = stateless_loss(model, buffers, loss_fn)
    size = x.shape[0]

    def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
        return jvp(grad(lambda p: batch_loss(p, x, y) * size), (params,), (tangent,))[1]

    names = list(params)
    flat_size = sum(params[n].numel() for n in names)
    reference = next(iter(params.values()))
    diagonal = torch.empty(flat_size, dtype=reference.dtype, device=reference.device)
    for part in chunks(flat_size, chunk_size * 8):
        index = torch.arange(part.start, part.stop, device=reference.device)
        basis = torch.zeros(len(index), flat_size, dtype=reference.dtype, device=reference.device)
        basis[torch.arange(len(index)), index] = 1.0
        columns = vmap(hvp)(_unflatten(basis, params))
        flat_columns = torch.cat([columns[n].reshape(len(index), -1) for n in names], dim=1)
        diagonal[part] = flat_columns[torch.arange(len(index)), index]
    return _unflatten(diagonal[None], params, squeeze=True)


def _output_hessian_factor(logits: Tensor, target: Tensor, loss_fn: LossFn) -> Tensor:
    """Rows ``s_k`` with ``Σ_k s_k s_kᵀ = ∇²_f ℓ(f, y)`` for one example's logits ``f``.

    For cross-entropy ``∇²_f ℓ = diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``: the C rows
    ``s_c = √p_c (e_c − p)``, stacked as ``S``, satisfy ``√pᵀ S = 0`` (the matrix has rank C − 1).
    A Householder reflection ``Q = I − 2vvᵀ/‖v‖²`` with ``v = e_0 + √p`` maps ``e_0`` to ``−√p``,
    so row 0 of ``QS`` is zero and its other C − 1 rows are an exact factor (``QᵀQ = I``):
    every later cost that scales with the rows drops by a factor (C − 1)/C. ``‖v‖² ≥ 2``, so
    the reflection is always well conditioned.
    Other losses use the eigendecomposition; a loss with a non-convex output (a negative
    eigenvalue) has no Gauss-Newton factor and is clipped at zero.
    """
    logits = logits.detach()
    if loss_fn is F.cross_entropy:
        p = torch.softmax(logits, dim=-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        rows = p.sqrt()[:, None] * (eye - p[None, :])  # C rows, rank C − 1
        v = eye[0] + p.sqrt()
        if p.shape[-1] == 1:  # one logit: the loss is constant, its one row is zero
            return rows
        reflected = rows - (2 / (v @ v)) * torch.outer(v, v @ rows)  # Q S
        return reflected[1:]
    output_hessian = hessian(lambda f: loss_fn(f[None], target[None]))(logits)
    eigenvalues, eigenvectors = torch.linalg.eigh(output_hessian)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()[None, :]).T


def _squared_jacobian_products(model, params, buffers, x, targets, factor, chunk_size) -> dict[str, Tensor]:
    """``Σ_n Σ_k (J_nᵀ s_nk)²`` for factor rows ``s_nk = factor(logits_n, target_n)`` (``[K, C]`` per example).

    Forward hooks and one batched backward for Linear/Conv/BatchNorm networks (:mod:`ggn_fast`);
    per-example vector-Jacobian products under vmap for anything else.
    """
    if ggn_fast.supports(model):
        rows = vmap(factor)
        total: dict[str, Tensor] | None = None
        for part in chunks(x.shape[0], chunk_size):  # bounds the K-fold activations of the batched backward
            piece = ggn_fast.ggn_diagonal_sum(model, x[part], lambda logits: rows(logits, targets[part]), chunk_size)
            if piece is None:
                total = None
                break
            total = tree_add_(total, piece)
        if total is not None:
            return total
    logits_of = stateless_logits(model, buffers)

    def example(x_n: Tensor, t_n: Tensor) -> dict[str, Tensor]:
        logits, pullback = vjp(lambda p: logits_of(p, x_n[None])[0], params)
        (columns,) = vmap(pullback)(factor(logits.detach(), t_n))
        return {k: (g**2).sum(0) for k, g in columns.items()}

    return _sum_over_examples(example, x, targets, chunk_size)


def _ggn_batch(model, params, buffers, x, y, *, loss_fn, chunk_size, **_) -> dict[str, Tensor]:
    """Rows of the output-Hessian factor: ``Σ_k s_k s_kᵀ = ∇²_f ℓ`` (:func:`_output_hessian_factor`)."""
    factor = lambda z, t: _output_hessian_factor(z, t, loss_fn)  # noqa: E731
    return _squared_jacobian_products(model, params, buffers, x, y, factor, chunk_size)


def _empirical_fisher_batch(model, params, buffers, x, y, *, loss_fn, chunk_size, **_) -> dict[str, Tensor]:
    """One row per example: the loss gradient at the logits, ``s = ∇_f ℓ(f, y)``."""
    return _squared_jacobian_products(model, params, buffers, x, y, _logit_gradients(loss_fn), chunk_size)


def _mc_ggn_batch(model, params, buffers, x, y, *, loss_fn, num_samples, generator, chunk_size, **_):
    """``num_samples`` rows per example, ``∇_f ℓ(f, ŷ_k) / √m`` with ``ŷ_k ~ softmax(f)``: unbiased for the GGN.

    For cross-entropy ``E_ŷ[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − ppᵀ``, the output Hessian.
    """
    if loss_fn is not F.cross_entropy:
        raise ValueError(
            "method='mc_ggn' samples labels from the model's softmax, so it needs "
            "loss_fn=torch.nn.functional.cross_entropy; use method='ggn' for other losses."
        )
    with torch.no_grad():
        logits = functional_call(model, (params, buffers), (x,))
        probabilities = torch.softmax(logits.double(), dim=-1)
        device = generator.device if generator is not None else probabilities.device
        sampled = torch.multinomial(probabilities.to(device), num_samples, replacement=True, generator=generator)
    gradients = _logit_gradients(loss_fn)
    scale = num_samples**-0.5

    def factor(z: Tensor, labels: Tensor) -> Tensor:
        return vmap(lambda label: gradients(z, label)[0])(labels) * scale

    return _squared_jacobian_products(model, params, buffers, x, sampled.to(x.device), factor, chunk_size)


def _logit_gradients(loss_fn: LossFn):
    """``(logits_n, target_n) -> [1, C]``: the gradient of one example's loss at its logits."""

    def rows(z: Tensor, target: Tensor) -> Tensor:
        return grad(lambda f: loss_fn(f[None], target[None]))(z.detach())[None]

    return rows


def _hutchinson_batch(model, params, buffers, x, y, *, loss_fn, num_probes, generator, chunk_size, **_):
    """Σ over the batch of ``z ⊙ (∇²ℓ) z`` averaged over Rademacher probes z (fresh per batch)."""
    batch_loss = stateless_loss(model, buffers, loss_fn)
    size = x.shape[0]

    def probe_product(z: dict[str, Tensor]) -> dict[str, Tensor]:
        hz = jvp(grad(lambda p: batch_loss(p, x, y) * size), (params,), (z,))[1]
        return {k: z[k] * hz[k] for k in z}

    total: dict[str, Tensor] | None = None
    for part in chunks(num_probes, chunk_size):
        probes = {k: _rademacher((part.stop - part.start, *p.shape), p, generator) for k, p in params.items()}
        total = tree_add_(total, {k: v.sum(0) for k, v in vmap(probe_product)(probes).items()})
    return {k: v / num_probes for k, v in total.items()}


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype=like.dtype, device=like.device)


def _sum_over_examples(example, x: Tensor, y: Tensor, chunk_size: int) -> dict[str, Tensor]:
    total: dict[str, Tensor] | None = None
    for part in chunks(x.shape[0], chunk_size):
        total = tree_add_(total, {k: v.sum(0) for k, v in vmap(example)(x[part], y[part]).items()})
    return total


def _unflatten(flat: Tensor, like: dict[str, Tensor], squeeze: bool = False) -> dict[str, Tensor]:
    """Split ``flat`` of shape ``[k, P]`` into ``{name: [k, *shape]}`` (or ``{name: shape}`` with squeeze)."""
    out, start = {}, 0
    for name, p in like.items():
        piece = flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape)
        out[name] = piece[0] if squeeze else piece
        start += p.numel()
    return out
