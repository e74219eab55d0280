"""Diagonal curvature of the training loss at the trained weights.

The paper (section 4.1, eq. 8 and the text after it) measures sharpness along each parameter by
the diagonal of ``H_learn(θ*)``, the Hessian of the learning loss (eq. 2). All estimators here
return the diagonal for the MEAN loss ``(1/N) Σ_n ℓ(h(x_n, θ), y_n)`` over every sample of
``batches``; multiply by N for the SUM loss of eq. 2 (the scale does not change any ranking).

Every estimator runs the model in eval mode (BatchNorm uses its running statistics, dropout is
off) and puts each module's mode back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from lightning_sa_unlearn.curvature import ggn_fast
from lightning_sa_unlearn.curvature.losses import BatchLoss, output_loss
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
        choice=_Choice(),
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


@dataclass
class _Choice:
    """What the first batch of one call decided for the others: the per-example path and the HVP form."""

    path: str | None = None
    """``"hooks"`` (:mod:`ggn_fast`), ``"vmap"`` (per-example vector-Jacobian products) or ``"loop"``."""
    vmap_ran: bool = False
    hvp: str | None = None
    """``"forward"`` (forward-over-reverse under vmap) or ``"double"`` (double backward)."""


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


# ---------------------------------------------------------------------------- Hessian-vector products


def _exact_batch(model, params, buffers, x, y, *, loss_fn, chunk_size, choice, **_) -> dict[str, Tensor]:
    """Σ over the batch of ``diag ∇²ℓ``: column i of H is ``H e_i``; keep its i-th entry."""
    with _twice_differentiable(model):
        return _exact_columns(model, params, buffers, x, y, loss_fn, chunk_size, choice)


def _exact_columns(model, params, buffers, x, y, loss_fn, chunk_size, choice) -> dict[str, Tensor]:
    products = _hessian_vector_products(model, params, buffers, x, y, loss_fn, choice)
    names = list(params)
    flat_size = sum(params[n].numel() for n in names)
    reference = next(iter(params.values()))
    diagonal = torch.empty(flat_size, dtype=reference.dtype, device=reference.device)
    for part in chunks(flat_size, chunk_size * 8):
        index = torch.arange(part.start, part.stop, device=reference.device)
        basis = torch.zeros(len(index), flat_size, dtype=reference.dtype, device=reference.device)
        basis[torch.arange(len(index)), index] = 1.0
        columns = products(_unflatten(basis, params))
        flat_columns = torch.cat([columns[n].reshape(len(index), -1) for n in names], dim=1)
        diagonal[part] = flat_columns[torch.arange(len(index)), index]
    return _unflatten(diagonal[None], params, squeeze=True)


def _hutchinson_batch(model, params, buffers, x, y, *, loss_fn, num_probes, generator, chunk_size, choice, **_):
    """Σ over the batch of ``z ⊙ (∇²ℓ) z`` averaged over Rademacher probes z (fresh per batch)."""
    with _twice_differentiable(model):
        products = _hessian_vector_products(model, params, buffers, x, y, loss_fn, choice)
        total: dict[str, Tensor] | None = None
        for part in chunks(num_probes, chunk_size):
            probes = {k: _rademacher((part.stop - part.start, *p.shape), p, generator) for k, p in params.items()}
            hz = products(probes)
            total = tree_add_(total, {k: (probes[k] * hz[k]).sum(0) for k in probes})
    return {k: v / num_probes for k, v in total.items()}


@contextlib.contextmanager
def _twice_differentiable(model: nn.Module) -> Iterator[None]:
    """Weight norm in plain operations while second derivatives are taken, where the model uses it.

    ``torch._weight_norm`` (``parametrizations.weight_norm`` and the legacy ``weight_norm``) runs a
    fused kernel whose double backward treats the saved norm as a constant: its Hessian diagonal
    is off by about 50% on the direction parameter (measured against finite differences, torch
    2.14), and it has no forward-mode derivative. ``v · (g / ‖v‖)`` from primitives has both.
    """
    if not _uses_weight_norm(model):
        yield
        return
    with _PlainWeightNorm():
        yield


class _PlainWeightNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


def _uses_weight_norm(model: nn.Module) -> bool:
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(
        isinstance(module, _WeightNorm) or any(isinstance(h, WeightNorm) for h in module._forward_pre_hooks.values())
        for module in model.modules()
    )


def _hessian_vector_products(model, params, buffers, x, y, loss_fn, choice: _Choice):
    """``tangents -> H tangents`` for the batch's summed loss, each ``{name: [k, *shape]}``.

    Forward-over-reverse under vmap; where an operation has no forward-mode derivative (weight norm,
    oneDNN LSTM, the backward of mse_loss) the first batch falls back to double backward, and every
    later batch of the call uses it too.
    """
    batch_loss = stateless_loss(model, buffers, loss_fn)
    size = x.shape[0]

    def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
        return jvp(grad(lambda p: batch_loss(p, x, y) * size), (params,), (tangent,))[1]

    forward = vmap(hvp)
    chosen: list[Callable] = []
    if choice.hvp == "forward":
        return forward
    if choice.hvp == "double":
        return _double_backward_products(model, params, buffers, x, y, loss_fn)

    def first(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        if chosen:
            return chosen[0](tangents)
        try:
            out = forward(tangents)
            choice.hvp = "forward"
            chosen.append(forward)
            return out
        except RuntimeError as forward_error:  # NotImplementedError included
            try:
                double = _double_backward_products(model, params, buffers, x, y, loss_fn)
                out = double(tangents)
            except RuntimeError as double_error:
                raise ValueError(
                    "Hessian-vector products are not available for this model and loss: forward-mode AD "
                    f"failed ({_first_line(forward_error)}) and so did double backward "
                    f"({_first_line(double_error)}). Use GGN() or MonteCarloGGN(), which need first "
                    "derivatives only (the GGN equals the Hessian for piecewise-linear operations such "
                    "as Hardsigmoid or ReLU)."
                ) from double_error
            log.info("forward-mode AD failed (%s); using double-backward Hessian-vector products", forward_error)
            choice.hvp = "double"
            chosen.append(double)
            return out

    return first


def _double_backward_products(model, params, buffers, x, y, loss_fn):
    """``H t`` as ``∂(∇ℓ · t)/∂θ``: one backward through the gradient's graph per batch of tangents."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    names = list(leaves)
    loss = loss_fn(functional_call(model, (leaves, buffers), (x,)), y) * x.shape[0]
    gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(gradients) if g is not None and g.requires_grad]

    def products(tangents: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {n: torch.zeros_like(tangents[n]) for n in names}
        if not live:  # the loss is at most linear in every parameter
            return out
        outputs = [gradients[i] for i in live]
        columns = _batched_grad(outputs, list(leaves.values()), [tangents[names[i]] for i in live])
        for name, column in zip(names, columns):
            if column is not None:
                out[name] = column.detach()
        return out

    return products


def _batched_grad(outputs, inputs, grad_outputs) -> list[Tensor | None]:
    """``torch.autograd.grad`` of each row of the batched ``grad_outputs``, stacked; a loop where vmap cannot run."""
    try:
        return list(
            torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        )
    except RuntimeError:
        rows = grad_outputs[0].shape[0]
        each = [
            torch.autograd.grad(outputs, inputs, [g[j] for g in grad_outputs], retain_graph=True, allow_unused=True)
            for j in range(rows)
        ]
        return [None if each[0][i] is None else torch.stack([e[i] for e in each]) for i in range(len(inputs))]


# ---------------------------------------------------------------------------- per-example methods


def _output_hessian_factor(logits: Tensor, target: Tensor, loss_fn: LossFn) -> Tensor:
    """Rows ``s_k`` with ``Σ_k s_k s_kᵀ = ∇²_f ℓ(f, y)`` for one example's logits ``f``.

    For cross-entropy ``∇²_f ℓ = diag(p) − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ``: the C rows
    ``s_c = √p_c (e_c − p)``, stacked as ``S``, satisfy ``√pᵀ S = 0`` (the matrix has rank C − 1).
    A Householder reflection ``Q = I − 2vvᵀ/‖v‖²`` with ``v = e_0 + √p`` maps ``e_0`` to ``−√p``,
    so row 0 of ``QS`` is zero and its other C − 1 rows are an exact factor (``QᵀQ = I``):
    every later cost that scales with the rows drops by a factor (C − 1)/C. ``‖v‖² ≥ 2``, so
    the reflection is always well conditioned.
    Other losses: the rows of :mod:`~lightning_sa_unlearn.curvature.losses` for a batch of this one example.
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
    return output_loss(loss_fn).batch(logits[None], target[None]).factor(slice(None))[0]


@dataclass
class _Rows:
    """The factor rows of a batch: from each example's own logits (``factor(logits_n, target_n)`` over
    ``targets``, the default cross-entropy), or precomputed for a slice of examples (``of_part``)."""

    targets: Tensor | None = None
    factor: Callable[[Tensor, Tensor], Tensor] | None = None
    of_part: Callable[[slice], Tensor] | None = None

    def for_logits(self, part: slice, logits: Tensor) -> Tensor:
        """``[n, K, *output shape]`` for the examples ``part`` whose logits are ``logits``."""
        if self.of_part is not None:
            return self.of_part(part)
        return vmap(self.factor)(logits, self.targets[part])


def _ggn_batch(model, params, buffers, x, y, *, loss, chunk_size, max_classes, choice, **_) -> dict[str, Tensor]:
    """Rows of the output-Hessian factor: ``Σ_k s_k s_kᵀ = ∇²_f ℓ`` (:func:`_output_hessian_factor`)."""
    if loss.plain_cross_entropy(y):
        factor = lambda z, t: _output_hessian_factor(z, t, F.cross_entropy)  # noqa: E731
        rows = _Rows(targets=y, factor=factor)
    else:
        rows = _Rows(of_part=_batch_loss(model, params, buffers, x, y, loss).factor)
    return _squared_jacobian_products(model, params, buffers, x, rows, chunk_size, choice, max_outputs=max_classes)


def _empirical_fisher_batch(model, params, buffers, x, y, *, loss_fn, loss, chunk_size, choice, **_):
    """One row per example: the loss gradient at the logits, ``s = ∇_f ℓ(f, y)``."""
    if loss.plain_cross_entropy(y):
        rows = _Rows(targets=y, factor=_logit_gradients(loss_fn))
    else:
        rows = _Rows(of_part=_batch_loss(model, params, buffers, x, y, loss).gradient)
    return _squared_jacobian_products(model, params, buffers, x, rows, chunk_size, choice)


def _mc_ggn_batch(model, params, buffers, x, y, *, loss_fn, loss, num_samples, generator, chunk_size, choice, **_):
    """``num_samples`` rows per example, ``∇_f ℓ(f, ŷ_k) / √m`` with ``ŷ_k ~ softmax(f)``: unbiased for the GGN.

    For cross-entropy ``E_ŷ[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − ppᵀ``, the output Hessian. Other losses:
    :meth:`~lightning_sa_unlearn.curvature.losses.BatchLoss.sampled`.
    """
    if not loss.plain_cross_entropy(y):
        sampled = _batch_loss(model, params, buffers, x, y, loss).sampled(slice(None), num_samples, generator)
        rows = _Rows(of_part=lambda part: sampled[part])
        return _squared_jacobian_products(model, params, buffers, x, rows, chunk_size, choice)
    with torch.no_grad():
        logits = functional_call(model, (params, buffers), (x,))
        probabilities = torch.softmax(logits.double(), dim=-1)
        _require_finite(probabilities)
        device = generator.device if generator is not None else probabilities.device
        sampled = torch.multinomial(probabilities.to(device), num_samples, replacement=True, generator=generator)
    gradients = _logit_gradients(loss_fn)
    scale = num_samples**-0.5

    def factor(z: Tensor, labels: Tensor) -> Tensor:
        return vmap(lambda label: gradients(z, label)[0])(labels) * scale

    rows = _Rows(targets=sampled.to(x.device), factor=factor)
    return _squared_jacobian_products(model, params, buffers, x, rows, chunk_size, choice)


def _batch_loss(model, params, buffers, x, y, loss) -> BatchLoss:
    with torch.no_grad():
        logits = functional_call(model, (params, buffers), (x,))
    return loss.batch(logits, y)


def _logit_gradients(loss_fn: LossFn):
    """``(logits_n, target_n) -> [1, C]``: the gradient of one example's loss at its logits."""

    def rows(z: Tensor, target: Tensor) -> Tensor:
        return grad(lambda f: loss_fn(f[None], target[None]))(z.detach())[None]

    return rows


def _squared_jacobian_products(
    model, params, buffers, x, rows: _Rows, chunk_size: int, choice: _Choice, max_outputs: int | None = None
) -> dict[str, Tensor]:
    """``Σ_n Σ_k (J_nᵀ s_nk)²`` for the factor rows ``s_nk`` (``[K, *output shape]`` per example).

    Forward hooks and one batched backward for Linear/Conv/BatchNorm networks (:mod:`ggn_fast`) where
    the first batch's check confirms them; per-example vector-Jacobian products under vmap for
    anything else; a loop over examples where vmap cannot run the model (an LSTM in float64).
    """
    if choice.path is None:
        choice.path = _choose_path(model, params, buffers, x, rows, max_outputs)
    if choice.path == "hooks":
        total: dict[str, Tensor] | None = None
        for part in chunks(x.shape[0], chunk_size):  # bounds the K-fold activations of the batched backward
            piece = ggn_fast.ggn_diagonal_sum(model, x[part], lambda logits: rows.for_logits(part, logits), chunk_size)
            if piece is None:
                total = None
                break
            total = tree_add_(total, piece)
        if total is not None:
            return total
    if choice.path != "loop":
        try:
            return _vmap_squares(model, params, buffers, x, rows, chunk_size)
        except RuntimeError as error:
            if choice.vmap_ran:
                raise
            log.info("torch.func.vmap cannot run this model (%s); looping over examples instead", error)
            choice.path = "loop"
        finally:
            choice.vmap_ran = True
    return _loop_squares(model, params, buffers, x, rows, chunk_size)


def _choose_path(model, params, buffers, x, rows: _Rows, max_outputs: int | None) -> str:
    """Check the first two examples: refuse a model that mixes examples, or too many outputs; hooks if they agree."""
    probe = x[:2]
    with torch.no_grad():
        together = functional_call(model, (params, buffers), (probe,))
        alone = torch.cat([functional_call(model, (params, buffers), (probe[i : i + 1],)) for i in range(len(probe))])
    outputs = together[0].numel()
    if max_outputs is not None and outputs > max_outputs:
        raise ValueError(
            f"method='ggn' back-propagates one row per output entry, and this model has {outputs:,} outputs "
            f"per example (shape {tuple(together.shape[1:])}), above max_classes={max_outputs:,}: the exact "
            "GGN would cost that many gradient passes. Use MonteCarloGGN() (method='mc_ggn'), about two "
            "gradient passes per sampled label whatever the number of classes, or raise GGN(max_classes=...)."
        )
    if together.shape != alone.shape or not _close(together, alone):
        raise ValueError(
            "the model's output for an example depends on the other examples of its batch (outputs of two "
            "examples computed together differ from each computed alone), so the per-example methods (GGN, "
            "MonteCarloGGN, EmpiricalFisher) do not apply. Use Hutchinson() or ExactHessian(), which "
            "differentiate each batch's loss."
        )
    if not ggn_fast.supports(model):
        return "vmap"
    problem = ggn_fast.verify(model, probe, lambda logits: rows.for_logits(slice(0, len(probe)), logits))
    if problem is not None:
        log.info("the forward-hook GGN path does not apply (%s); using per-example products", problem)
        return "vmap"
    return "hooks"


def _close(a: Tensor, b: Tensor) -> bool:
    tolerance = ggn_fast.tolerance(a.dtype)
    return bool((a - b).abs().max() <= tolerance * a.abs().max() + torch.finfo(a.dtype).tiny)


def _vmap_squares(model, params, buffers, x, rows: _Rows, chunk_size: int) -> dict[str, Tensor]:
    logits_of = stateless_logits(model, buffers)
    if rows.of_part is None:
        factor = rows.factor

        def example(x_n: Tensor, t_n: Tensor) -> dict[str, Tensor]:
            logits, pullback = vjp(lambda p: logits_of(p, x_n[None])[0], params)
            (columns,) = vmap(pullback)(factor(logits.detach(), t_n))
            return {k: (g**2).sum(0) for k, g in columns.items()}

        return _sum_over_examples(example, x, rows.targets, chunk_size)

    def example_rows(x_n: Tensor, rows_n: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: logits_of(p, x_n[None])[0], params)
        (columns,) = vmap(pullback)(rows_n)
        return {k: (g**2).sum(0) for k, g in columns.items()}

    total: dict[str, Tensor] | None = None
    for part in chunks(x.shape[0], chunk_size):
        total = tree_add_(total, {k: v.sum(0) for k, v in vmap(example_rows)(x[part], rows.of_part(part)).items()})
    return total


def _loop_squares(model, params, buffers, x, rows: _Rows, chunk_size: int) -> dict[str, Tensor]:
    """The same sum with one forward and one batched backward per example, no vmap through the model."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for part in chunks(x.shape[0], chunk_size):
        logits = None
        if rows.of_part is None:
            with torch.no_grad():
                logits = functional_call(model, (params, buffers), (x[part],))
        block = rows.for_logits(part, logits)
        for i, x_n in enumerate(x[part]):
            out = functional_call(model, (leaves, buffers), (x_n[None],))
            columns = _batched_grad([out], list(leaves.values()), [block[i][:, None]])
            for name, column in zip(leaves, columns):
                if column is not None:
                    total[name] += (column.detach() ** 2).sum(0)
    return total


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


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _describe(loss_fn: LossFn) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def _require_finite(probabilities: Tensor) -> None:
    """Labels cannot be sampled from NaN probabilities: say so as a non-finite curvature."""
    if not torch.isfinite(probabilities).all():
        raise RuntimeError(
            "the curvature is not finite: the model's outputs hold NaN/inf, so mc_ggn cannot sample labels. "
            "Check the weights and the training data for NaN/inf. Weights were left unchanged."
        )
