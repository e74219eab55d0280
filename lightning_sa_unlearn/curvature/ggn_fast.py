"""The exact GGN diagonal from one batched backward pass and per-layer products, without per-example vmap.

``diag G = Σ_n Σ_k (J_nᵀ s_nk)²`` where ``s_nk`` are the rows of a factor of the output Hessian
(:func:`~lightning_sa_unlearn.curvature.functional._output_hessian_factor`). Back-propagating the K rows at
once (``is_grads_batched``) gives, at each layer output, the signals ``δ_nk = J_{n,out}ᵀ s_nk``;
the squared parameter gradients then follow from the layer's saved input ``a_n``:

* ``Linear`` (2-D input): ``Σ_{n,k} δ²_nk ⊗ a²_n``, a single matrix product;
* ``Linear`` on sequences, ``Conv1d/2d``: per-example gradients ``δ_nk · unfold(a_n)ᵀ``, squared;
* ``BatchNorm`` in eval mode: ``(Σ_pixels δ x̂)²`` and ``(Σ_pixels δ)²``.

The same quantity as the per-example path in :mod:`~lightning_sa_unlearn.curvature.functional`; it is used
when every module that owns a trainable parameter is of a supported type (:func:`supports`) and
:func:`verify` confirms, on the first two examples, that the hooks see each parameter's whole
per-example gradient. The static check cannot see a weight used outside its module (a tied decoder
``F.linear(h, enc.weight.t())``) or a Linear applied to activations whose first dimension is not the
batch (time-major ``[T, B, F]``); the hook path would silently square the wrong sums there, and the
check sends both to the per-example path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sa_unlearn.functional import batch_size

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def supports(model: nn.Module) -> bool:
    """True when every module owning a trainable parameter is one this path handles (convolutions: groups=1).

    Exact types only (a subclass may override ``forward``), no parameter shared by two modules, and only
    the plain ``weight`` and ``bias`` (not ``weight_norm``'s ``weight_g``/``weight_v``, nor parametrizations).
    """
    owned = [id(p) for module in model.modules() for p in module.parameters(recurse=False) if p.requires_grad]
    if len(owned) != len(set(owned)):
        return False
    for module in model.modules():
        names = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not names:
            continue
        if type(module) not in SUPPORTED or getattr(module, "groups", 1) != 1:
            return False
        if not set(names) <= {"weight", "bias"} or parametrize.is_parametrized(module):
            return False
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and (
            isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
            return False
    return True


def ggn_diagonal_sum(model: nn.Module, x: Tensor, factor_fn, chunk_size: int) -> dict[str, Tensor] | None:
    """``Σ_n diag GGN_n`` over the batch ``x``; ``factor_fn(logits) -> [N, K, C]`` gives the factor rows.

    None when the forward pass did not call every parameter-owning module exactly once (a module
    reused or skipped): the caller then takes the per-example path. A module whose output the logits
    do not use (an extra head) gets zeros.
    """
    owners = {
        module: [(name, p) for name, p in module.named_parameters(recurse=False) if p.requires_grad]
        for module in model.modules()
    }
    owners = {m: ps for m, ps in owners.items() if ps}
    full_names = {id(p): name for name, p in model.named_parameters()}
    saved: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    calls = dict.fromkeys(owners, 0)

    def keep(module, inputs, output):
        calls[module] += 1
        saved[module] = (inputs[0].detach(), output)
        return output.clone()  # later in-place ops (ReLU(inplace), +=) must not rewrite the saved output

    handles = [module.register_forward_hook(keep) for module in owners]
    total: dict[str, Tensor] = {}
    try:
        logits = model(x)
        if any(count != 1 for count in calls.values()):
            return None
        factor = factor_fn(logits.detach())  # [N, K, C]
        modules = list(owners)
        outputs = [saved[m][1] for m in modules]
        if factor.shape[1] == 1:  # one row (a sampled label): a plain backward pass, without vmap's batching
            signals = torch.autograd.grad(logits, outputs, grad_outputs=factor[:, 0], allow_unused=True)
            signals = tuple(None if s is None else s.unsqueeze(0) for s in signals)
        else:
            signals = torch.autograd.grad(
                logits, outputs, grad_outputs=factor.transpose(0, 1), is_grads_batched=True, allow_unused=True
            )  # each [K, N, *output shape]
        for module, delta in zip(modules, signals):
            if delta is None:  # the logits do not depend on this module's output
                squares = [torch.zeros_like(p) for _, p in owners[module]]
            else:
                squares = _squared_gradients(module, saved[module][0], delta, chunk_size)
            for (local, p), value in zip(owners[module], squares):
                name = full_names[id(p)]
                total[name] = total.get(name, 0) + value.reshape(p.shape)
    finally:
        for handle in handles:
            handle.remove()
    return total


def verify(model: nn.Module, x: Tensor, factor_fn) -> str | None:
    """None when the hook path gives, on the examples ``x`` (two suffice), autograd's per-example squared gradients.

    The reference back-propagates each example's first rows alone through the same batch
    (``is_grads_batched``), so it also sees a weight used outside its module, activations whose
    first dimension is not the batch, and examples that influence each other. Otherwise a
    string that says which parameter differs.
    """
    factor_fn = _first_rows(factor_fn, VERIFIED_ROWS)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    try:
        hooks = ggn_diagonal_sum(model, x, factor_fn, batch_size(x))
        if hooks is None:
            return "a module that owns parameters was called more than once, or not at all"
        logits = model(x)
        rows = factor_fn(logits.detach())  # [n, K, *output shape]
        n, k = rows.shape[:2]
        grad_outputs = torch.zeros(n, k, *logits.shape, dtype=rows.dtype, device=rows.device)
        for i in range(n):
            grad_outputs[i, :, i] = rows[i]
        gradients = torch.autograd.grad(
            logits,
            [p for _, p in params],
            grad_outputs.reshape(n * k, *logits.shape),
            is_grads_batched=True,
            allow_unused=True,
        )
    except RuntimeError as error:  # e.g. an operation that batched backward (vmap) cannot run
        return f"the hook path failed: {error}"
    tolerance_ = tolerance(logits.dtype)
    for (name, p), g in zip(params, gradients):
        reference = torch.zeros_like(p) if g is None else (g.detach() ** 2).sum(0)
        found = hooks.get(name, torch.zeros_like(p))
        difference = float((found - reference).norm())
        if difference > tolerance_ * float(reference.norm() + found.norm()) + torch.finfo(p.dtype).tiny:
            relative = difference / max(float(reference.norm()), 1e-300)
            return (
                f"{name}: the hooks' squared per-example gradients are off by {relative:.2g} (relative) against "
                "autograd; the weight is used outside its module (a tied weight) or its module sees activations "
                "whose first dimension is not the batch"
            )
    return None


VERIFIED_ROWS = 2
"""Factor rows per example that :func:`verify` compares: any row shows a hook path that sums the wrong terms."""


def _first_rows(factor_fn, rows: int):
    return lambda logits: factor_fn(logits)[:, :rows]


def tolerance(dtype: torch.dtype) -> float:
    """Relative agreement expected between two orders of the same sums in ``dtype``."""
    return min(0.05, max(1e-5, 1000 * torch.finfo(dtype).eps))


def _squared_gradients(module: nn.Module, a: Tensor, delta: Tensor, chunk_size: int) -> list[Tensor]:
    """``[Σ_{n,k} g_nk² for each trainable parameter of module]`` in ``named_parameters`` order."""
    wanted = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if isinstance(module, nn.Linear) and a.dim() == 2:
        out = {"weight": torch.einsum("kno,ni->oi", delta**2, a**2), "bias": (delta**2).sum(dim=(0, 1))}
        return [out[n] for n in wanted]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        shape = [1, -1] + [1] * (a.dim() - 2)
        x_hat = (a - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
        reduce = tuple(range(3, delta.dim()))  # pixels
        out = {
            "weight": ((delta * x_hat).sum(dim=reduce) ** 2).sum(dim=(0, 1))
            if reduce
            else ((delta * x_hat) ** 2).sum(dim=(0, 1)),
            "bias": (delta.sum(dim=reduce) ** 2).sum(dim=(0, 1)) if reduce else (delta**2).sum(dim=(0, 1)),
        }
        return [out[n] for n in wanted]
    # Per-example gradients g_nk = δ_nk · unfold(a_n)ᵀ ([out, L] @ [L, features]), squared and summed
    totals = {n: 0 for n in wanted}
    k, length = delta.shape[0], _positions(module, a, delta)
    features = _features(module, a)
    out_channels = delta.shape[2] if not isinstance(module, nn.Linear) else delta.shape[-1]
    gram = length <= _GRAM_MAX_POSITIONS_PER_ROW * k
    copies = k * out_channels * length + features * length  # the permuted signals and the unfolded input
    if gram:  # A (out·L²) and B (features·L²) per example
        per_example = copies + (out_channels + features) * length * length
    else:  # the K-fold per-example gradients
        per_example = copies + k * out_channels * features
    step = max(1, min(chunk_size, _CHUNK_ELEMENTS // max(per_example, 1)))
    for start in range(0, a.shape[0], step):
        a_part, d_part = a[start : start + step], delta[:, start : start + step]
        if isinstance(module, nn.Linear):  # [n, ..., in] inputs: sum over the extra positions
            unfolded = a_part.reshape(a_part.shape[0], -1, a_part.shape[-1]).transpose(1, 2)  # [n, in, L]
            d = d_part.reshape(d_part.shape[0], d_part.shape[1], -1, d_part.shape[-1]).transpose(2, 3)  # [k,n,o,L]
        else:
            unfolded = _unfold(module, a_part)  # [n, in·kernel, L]
            d = d_part.reshape(d_part.shape[0], d_part.shape[1], d_part.shape[2], -1)  # [k, n, out, L]
        if "weight" in totals:
            square = _weight_squares_gram(d, unfolded) if gram else _weight_squares_direct(d, unfolded)
            totals["weight"] = totals["weight"] + square
        if "bias" in totals:
            totals["bias"] = totals["bias"] + (d.sum(dim=-1) ** 2).sum(dim=(0, 1))
    return [totals[n] for n in wanted]


_CHUNK_ELEMENTS = 2**25
"""Examples per chunk are chosen so that the per-example intermediates hold about this many numbers (128 MB)."""
_GRAM_MAX_POSITIONS_PER_ROW = 2
"""The Gram form is used where a layer's output positions L are at most this many times the factor rows K."""


def _weight_squares_direct(d: Tensor, unfolded: Tensor) -> Tensor:
    """``Σ_{n,k} (δ_nk u_nᵀ)²``: per example n, ``[k·out, L] @ [L, features]`` as one batched matmul, squared in place.

    Costs ``K·out·L·features`` multiply-adds per example; best where L is large.
    """
    k, n, o, length = d.shape
    per_example = torch.bmm(d.permute(1, 0, 2, 3).reshape(n, k * o, length), unfolded.transpose(1, 2))
    return per_example.square_().sum(dim=0).view(k, o, -1).sum(dim=0)


def _weight_squares_gram(d: Tensor, unfolded: Tensor) -> Tensor:
    """The same sum through Gram matrices over output positions, without per-example gradients:

    ``Σ_{n,k} (Σ_l δ_nkol u_nfl)² = Σ_n Σ_{l,m} A_nolm B_nflm`` with ``A_no = Σ_k δ_nko δ_nkoᵀ`` and
    ``B_nf = u_nf u_nfᵀ`` (both L×L), one matmul over ``(n, l, m)``. Costs ``out·features·L²``
    multiply-adds per example and no K-fold output; best where L is small (late conv layers).
    """
    k, n, o, length = d.shape
    rows = d.permute(1, 2, 0, 3).reshape(n * o, k, length)
    a_gram = torch.bmm(rows.transpose(1, 2), rows).view(n, o, length * length)  # [n, out, L·L]
    b_gram = (unfolded[:, :, :, None] * unfolded[:, :, None, :]).reshape(n, -1, length * length)  # [n, F, L·L]
    return a_gram.permute(1, 0, 2).reshape(o, -1) @ b_gram.permute(0, 2, 1).reshape(-1, b_gram.shape[1])


def _positions(module: nn.Module, a: Tensor, delta: Tensor) -> int:
    """Output positions L per example (1 for a Linear on vectors)."""
    if isinstance(module, nn.Linear):
        return max(1, a[0].numel() // a.shape[-1])
    return delta[0, 0, 0].numel()


def _features(module: nn.Module, a: Tensor) -> int:
    """Columns of the unfolded input: ``in·kernel`` for a convolution, ``in`` for a Linear."""
    if isinstance(module, nn.Linear):
        return a.shape[-1]
    return module.in_channels * math.prod(module.kernel_size)


def _unfold(module: nn.Module, a: Tensor) -> Tensor:
    """``[n, in·kh·kw, L]`` patches of the layer input, the columns a convolution multiplies its kernel with.

    Built from strided views (``Tensor.unfold``) and one copy, which is many times faster on CPU
    than ``F.unfold``; dilated kernels use ``F.unfold``.
    """
    if isinstance(module, nn.Conv1d):
        a = a.unsqueeze(-1)
        kernel, stride, padding, dilation = (
            (module.kernel_size[0], 1),
            (module.stride[0], 1),
            (module.padding[0], 0),
            (module.dilation[0], 1),
        )
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    if dilation != (1, 1):
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    patches = a.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])  # [n, c, H', W', kh, kw]
    n, c, height, width = patches.shape[:4]
    return patches.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kernel[0] * kernel[1], height * width)
