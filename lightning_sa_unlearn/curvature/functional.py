"""Diagonal curvature of the training loss at the trained weights.

The paper (section 4.1, eq. 8 and the text after it) measures sharpness along each parameter by
the diagonal of ``H_learn(θ*)``, the Hessian of the learning loss (eq. 2). All estimators here
return the diagonal for the MEAN loss ``(1/N) Σ_n ℓ(h(x_n, θ), y_n)`` over every sample of
``batches``; multiply by N for the SUM loss of eq. 2 (the scale does not change any ranking).

Every estimator runs the model in eval mode (BatchNorm uses its running statistics, dropout is
off) and puts each module's mode back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.curvature.losses import output_loss
from lightning_sa_unlearn.curvature.per_example import (  # noqa: F401 (re-exported for tests and callers)
    _batch_loss,
    _choose_path,
    _close,
    _empirical_fisher_batch,
    _ggn_batch,
    _logit_gradients,
    _loop_squares,
    _mc_ggn_batch,
    _output_hessian_factor,
    _Rows,
    _squared_jacobian_products,
    _sum_over_examples,
    _vmap_squares,
)
from lightning_sa_unlearn.curvature.second_derivatives import (  # noqa: F401 (re-exported for tests and callers)
    _batched_grad,
    _Choice,
    _double_backward_products,
    _exact_batch,
    _exact_columns,
    _first_line,
    _hessian_vector_products,
    _hutchinson_batch,
    _PlainWeightNorm,
    _rademacher,
    _twice_differentiable,
    _unflatten,
    _uses_weight_norm,
)
from lightning_sa_unlearn.functional import (
    LossFn,
    batch_size,
    batches_for,
    eval_mode,
    model_buffers,
    require_trainable_parameters,
    tree_add_,
)

CURVATURE_METHODS = ("exact", "ggn", "mc_ggn", "hutchinson", "empirical_fisher")
EXACT_MAX_PARAMETERS = 50_000
"""``method="exact"`` costs one Hessian-vector product per parameter and per batch; above this it refuses."""
MAX_CLASSES = 1000
"""``method="ggn"`` back-propagates one row per output entry (class, or class and position); above this it refuses."""
PER_EXAMPLE_METHODS = ("ggn", "mc_ggn", "empirical_fisher")

log = logging.getLogger(__name__)


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
    max_classes: int = MAX_CLASSES,
) -> dict[str, Tensor]:
    """Diagonal of the Hessian of the mean loss over ``batches``, one tensor per trainable parameter.

    Args:
        model: the trained network; only parameters with ``requires_grad`` get an entry.
        batches: any iterable of ``(x, y)`` pairs, for example a DataLoader.
        loss_fn: ``loss_fn(logits, y)`` returning the batch MEAN (torch's default reduction). The
            per-example methods read the loss's curvature in the outputs from the loss itself
            (:mod:`~lightning_sa_unlearn.curvature.losses`): cross-entropy with ``weight``,
            ``ignore_index`` and ``label_smoothing``, on ``[N, C]`` or per position ``[N, C, ...]``;
            ``nll_loss`` on log-probabilities; ``binary_cross_entropy_with_logits``; ``mse_loss``;
            any other loss through its Hessian in the outputs by autograd. For a class-weighted mean
            every method returns ``(1/N) Σ_batches N_b · diag ∇² loss_fn(batch)``.
        method: ``"exact"``, ``"ggn"``, ``"mc_ggn"``, ``"hutchinson"`` or ``"empirical_fisher"``:

            * ``"exact"``: ``diag H`` from one Hessian-vector product per parameter (vmapped).
              A test reference for small models; refuses above ``exact_max_parameters``.
            * ``"ggn"``: the exact diagonal of the generalized Gauss-Newton matrix
              ``G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n``. For cross-entropy,
              ``diag G = (1/N) Σ_n Σ_c p_nc · (∇_θ ℓ(x_n, c))²``, from per-example gradients.
              For networks that are piecewise linear in each layer (ReLU, max-pool, eval-mode
              BatchNorm, dropout in eval) it EQUALS the Hessian diagonal; for smooth
              nonlinearities (tanh, GELU, LayerNorm, attention, LSTM, ...) it is the positive
              semi-definite Gauss-Newton part of the Hessian. Costs one backward row per output
              entry; refuses above ``max_classes`` output entries per example.
            * ``"mc_ggn"``: an unbiased Monte-Carlo GGN diagonal from ``num_samples`` labels per
              example drawn from the distribution the loss defines (softmax for cross-entropy and
              ``nll_loss``; Rademacher combinations of the exact factor for
              ``binary_cross_entropy_with_logits`` and ``mse_loss``), about two gradient passes
              per sample. Refuses a loss it cannot identify.
            * ``"hutchinson"``: the unbiased estimate ``E_z[z ⊙ Hz]`` with ``num_probes``
              Rademacher probes and forward-over-reverse Hessian-vector products (double
              backward where an operation has no forward-mode derivative). Any
              twice-differentiable model.
            * ``"empirical_fisher"``: ``(1/N) Σ_n (∇_θ ℓ(x_n, y_n))²`` at the given labels.
              Cheap and biased: not a curvature estimate away from a perfect fit.

            The per-example methods (``ggn``, ``mc_ggn``, ``empirical_fisher``) use forward hooks
            and one batched backward where every parameter sits in a Linear, Conv or eval-mode
            BatchNorm layer and a check on the first two examples confirms that the hooks see
            each parameter's whole per-example gradient (a weight used outside its module, or a
            Linear applied to activations whose first dimension is not the batch, fail it); else
            per-example vector-Jacobian products under ``torch.func.vmap``, or a loop over
            examples where vmap cannot run the model. They refuse models whose output for one
            example depends on the others of its batch (BatchNorm without running statistics).
        num_probes: probes per batch for ``"hutchinson"``.
        generator: random source of the Hutchinson probes and the ``mc_ggn`` labels.
        num_samples: sampled labels per example for ``"mc_ggn"``.
        chunk_size: examples (or probes, or basis vectors) vmapped at once; bounds memory.
        exact_max_parameters: the size limit of ``"exact"``.
        max_classes: the most output entries per example (classes, times positions for per-pixel
            or per-token outputs) that ``"ggn"`` accepts.

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
        max_classes=max_classes,
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
    max_classes: int = MAX_CLASSES,
    on_batch: Callable[[dict[str, Tensor], int], None] | None = None,
    path: _Choice | None = None,
) -> tuple[dict[str, Tensor] | None, int]:
    """``(Σ_n diag ∇²ℓ_n, N)``: the unnormalised sum behind :func:`hessian_diagonal`, and the sample count.

    Sums from disjoint shards of the data add up, which is how several processes combine their
    work (``None`` when ``batches`` held no sample). ``on_batch(part, size)``, if given, sees each
    batch's own sum first (for standard errors: :class:`~lightning_sa_unlearn.curvature.SharpnessStatistics`).
    ``path``: the computation path chosen on a first batch (hooks, vmap or a loop; forward-mode or
    double-backward products), shared by calls on the same model so that its checks run once.
    Other arguments as in :func:`hessian_diagonal`.
    """
    if method not in CURVATURE_METHODS:
        raise ValueError(f"unknown curvature method {method!r}; choose one of {CURVATURE_METHODS}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}.")
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
    loss = output_loss(loss_fn)
    if method == "mc_ggn" and not loss.samples_labels:
        raise ValueError(
            "method='mc_ggn' samples labels from the distribution the loss defines, which it knows for "
            "cross_entropy, nll_loss, binary_cross_entropy_with_logits and mse_loss (functions, nn modules "
            f"or functools.partial of them, reduction='mean'); loss_fn {_describe(loss_fn)} is none of "
            "them. Use method='ggn' (GGN()), which reads any loss's Hessian in the outputs."
        )
    if method in PER_EXAMPLE_METHODS:
        _refuse_batch_statistics(model, method)
    per_batch = {
        "exact": _exact_batch,
        "ggn": _ggn_batch,
        "mc_ggn": _mc_ggn_batch,
        "hutchinson": _hutchinson_batch,
        "empirical_fisher": _empirical_fisher_batch,
    }[method]
    options = dict(
        loss_fn=loss_fn,
        loss=loss,
        num_probes=num_probes,
        num_samples=num_samples,
        generator=generator,
        chunk_size=chunk_size,
        max_classes=max_classes,
        choice=path if path is not None else _Choice(),
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
            if batch_size(x) == 0:
                continue
            part = batch_sum(x, y, params, buffers)
            if on_batch is not None:
                on_batch(part, batch_size(x))
            total = tree_add_(total, part)
            count += batch_size(x)
    return total, count


def _refuse_batch_statistics(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            not module.track_running_stats or module.running_mean is None
        ):
            raise ValueError(
                f"{name or type(model).__name__} ({type(module).__name__}) has no running statistics "
                "(track_running_stats=False): it normalises each example with the statistics of its batch, "
                f"so an example's loss depends on the other examples, and method={method!r}, which sums "
                "per-example terms, does not apply. Use Hutchinson() or ExactHessian() (method='hutchinson' "
                "or 'exact'), which differentiate each batch's loss, or give the layer running statistics."
            )


def _describe(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__
