"""Second derivatives for :mod:`~lightning_sa_unlearn.curvature.functional`: ``method="exact"`` and ``"hutchinson"``.

Hessian-vector products by forward-over-reverse under vmap, or double backward where an operation has
no forward-mode derivative; weight norm rewritten in plain operations while they are taken.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.overrides import TorchFunctionMode

from lightning_sa_unlearn.functional import batch_size, chunks, stateless_loss, tree_add_

log = logging.getLogger("lightning_sa_unlearn.curvature.functional")


@dataclass
class _Choice:
    """What the first batch of one call decided for the others: the per-example path and the HVP form."""

    path: str | None = None
    """``"hooks"`` (:mod:`ggn_fast`), ``"vmap"`` (per-example vector-Jacobian products) or ``"loop"``."""
    vmap_ran: bool = False
    hvp: str | None = None
    """``"forward"`` (forward-over-reverse under vmap) or ``"double"`` (double backward)."""


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
    size = batch_size(x)

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
    loss = loss_fn(functional_call(model, (leaves, buffers), (x,)), y) * batch_size(x)
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


def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    signs = torch.randint(0, 2, shape, generator=generator, device=device)
    return (signs * 2 - 1).to(dtype=like.dtype, device=like.device)


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
