"""Per-example curvature (``"ggn"``, ``"mc_ggn"``, ``"empirical_fisher"``) for :mod:`.functional`.

Each sums ``Σ_n Σ_k (J_nᵀ s_nk)²`` for factor rows ``s_nk`` of one example's output: forward hooks and one
batched backward (:mod:`~lightning_sa_unlearn.curvature.ggn_fast`), per-example products under vmap, or a loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vjp, vmap

import lightning_sa_unlearn.curvature.ggn_fast as ggn_fast
from lightning_sa_unlearn.curvature.losses import BatchLoss, output_loss, require_finite_probabilities
from lightning_sa_unlearn.curvature.second_derivatives import _batched_grad, _Choice
from lightning_sa_unlearn.functional import LossFn, batch_size, chunks, stateless_logits, take, tree_add_

log = logging.getLogger("lightning_sa_unlearn.curvature.functional")


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
    ``targets``, the default cross-entropy), precomputed for a slice of examples (``of_part``), or drawn
    from the logits of the pass that uses them (``of_logits``: Monte-Carlo labels on the hook path)."""

    targets: Tensor | None = None
    factor: Callable[[Tensor, Tensor], Tensor] | None = None
    of_part: Callable[[slice], Tensor] | None = None
    of_logits: Callable[[Tensor], Tensor] | None = None

    def for_logits(self, part: slice, logits: Tensor) -> Tensor:
        """``[n, K, *output shape]`` for the examples ``part`` whose logits are ``logits``."""
        if self.of_logits is not None:
            return self.of_logits(logits)
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
    gradients = _logit_gradients(loss_fn)
    scale = num_samples**-0.5

    def factor(z: Tensor, labels: Tensor) -> Tensor:
        return vmap(lambda label: gradients(z, label)[0])(labels) * scale

    def draw(logits: Tensor) -> Tensor:
        with torch.no_grad():
            probabilities = torch.softmax(logits.double(), dim=-1)
            require_finite_probabilities(probabilities)
            device = generator.device if generator is not None else probabilities.device
            labels = torch.multinomial(probabilities.to(device), num_samples, replacement=True, generator=generator)
        return labels.to(logits.device)

    if choice.path == "hooks":  # the labels come from the logits of the hooks' own forward: no separate pass
        rows = _Rows(of_logits=lambda logits: vmap(factor)(logits, draw(logits)))
        # the batched backward holds num_samples rows per example; with one, a whole batch fits like a plain pass
        examples = batch_size(x) if num_samples == 1 else chunk_size
        total = _squared_jacobian_products(model, params, buffers, x, rows, chunk_size, choice, pass_size=examples)
        if total is not None:
            return total
    with torch.no_grad():
        logits = functional_call(model, (params, buffers), (x,))
    rows = _Rows(targets=draw(logits), factor=factor)
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
    model,
    params,
    buffers,
    x,
    rows: _Rows,
    chunk_size: int,
    choice: _Choice,
    max_outputs: int | None = None,
    pass_size: int | None = None,
) -> dict[str, Tensor] | None:
    """``Σ_n Σ_k (J_nᵀ s_nk)²`` for the factor rows ``s_nk`` (``[K, *output shape]`` per example).

    ``pass_size``: examples per forward and batched backward on the hook path (default ``chunk_size``).
    None only for rows drawn from the pass's own logits (``of_logits``) where the hook path failed.

    Forward hooks and one batched backward for Linear/Conv/BatchNorm networks (:mod:`ggn_fast`) where
    the first batch's check confirms them; per-example vector-Jacobian products under vmap for
    anything else; a loop over examples where vmap cannot run the model (an LSTM in float64).
    """
    if choice.path is None:
        choice.path = _choose_path(model, params, buffers, x, rows, max_outputs)
    if choice.path == "hooks":
        total: dict[str, Tensor] | None = None
        for part in chunks(batch_size(x), pass_size or chunk_size):  # bounds the K-fold activations of the backward
            piece = ggn_fast.ggn_diagonal_sum(
                model, take(x, part), lambda logits: rows.for_logits(part, logits), chunk_size
            )
            if piece is None:
                total = None
                break
            total = tree_add_(total, piece)
        if total is not None:
            return total
        if rows.of_logits is not None:
            return None  # the caller draws its labels in a pass of their own for the other paths
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
    probe = take(x, slice(2))
    with torch.no_grad():
        together = functional_call(model, (params, buffers), (probe,))
        alone = torch.cat(
            [functional_call(model, (params, buffers), (take(probe, slice(i, i + 1)),)) for i in range(len(together))]
        )
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
    problem = ggn_fast.verify(model, probe, lambda logits: rows.for_logits(slice(0, len(together)), logits))
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
            logits, pullback = vjp(lambda p: logits_of(p, take(x_n, None))[0], params)
            (columns,) = vmap(pullback)(factor(logits.detach(), t_n))
            return {k: (g**2).sum(0) for k, g in columns.items()}

        return _sum_over_examples(example, x, rows.targets, chunk_size)

    def example_rows(x_n: Tensor, rows_n: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: logits_of(p, take(x_n, None))[0], params)
        (columns,) = vmap(pullback)(rows_n)
        return {k: (g**2).sum(0) for k, g in columns.items()}

    total: dict[str, Tensor] | None = None
    for part in chunks(batch_size(x), chunk_size):
        total = tree_add_(
            total, {k: v.sum(0) for k, v in vmap(example_rows)(take(x, part), rows.of_part(part)).items()}
        )
    return total


def _loop_squares(model, params, buffers, x, rows: _Rows, chunk_size: int) -> dict[str, Tensor]:
    """The same sum with one forward and one batched backward per example, no vmap through the model."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for part in chunks(batch_size(x), chunk_size):
        logits = None
        if rows.of_part is None:
            with torch.no_grad():
                logits = functional_call(model, (params, buffers), (take(x, part),))
        block = rows.for_logits(part, logits)
        for i in range(part.stop - part.start):
            out = functional_call(model, (leaves, buffers), (take(x, slice(part.start + i, part.start + i + 1)),))
            columns = _batched_grad([out], list(leaves.values()), [block[i][:, None]])
            for name, column in zip(leaves, columns):
                if column is not None:
                    total[name] += (column.detach() ** 2).sum(0)
    return total


def _sum_over_examples(example, x: Tensor, y: Tensor, chunk_size: int) -> dict[str, Tensor]:
    total: dict[str, Tensor] | None = None
    for part in chunks(batch_size(x), chunk_size):
        total = tree_add_(total, {k: v.sum(0) for k, v in vmap(example)(take(x, part), y[part]).items()})
    return total
