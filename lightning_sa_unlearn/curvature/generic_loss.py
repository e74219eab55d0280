"""The generic rule of :mod:`~lightning_sa_unlearn.curvature.losses`: any other loss's Hessian in the outputs.

The loss's Hessian in the outputs by autograd (double backward), checked to be block-diagonal over examples
(a loss that couples examples is refused) and positive semi-definite (a loss that is not convex in the
outputs has no Gauss-Newton matrix; refused).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_sa_unlearn.curvature.loss_base import BatchLoss, OutputLoss, _describe, _require_scalar

_ELEMENTS_PER_TANGENT_CHUNK = 2**22
"""The generic rule's Hessian columns are computed in chunks of tangents holding about this many numbers."""


class GenericLoss(OutputLoss):
    """Any other loss: each example's block of ``N_b ∇²_F L_b`` by double backward, factored by eigendecomposition."""

    name = "generic"
    samples_labels = False

    def batch(self, logits: Tensor, targets: Tensor) -> BatchLoss:
        return _GenericBatch(self, logits, targets)


class _GenericBatch(BatchLoss):
    def __init__(self, loss: OutputLoss, logits: Tensor, targets: Tensor) -> None:
        super().__init__(loss, logits, targets)
        self._rows: Tensor | None = None

    def factor(self, part: slice) -> Tensor:
        if self._rows is None:
            self._rows = self._factor_all()
        return self._rows[part]

    def _factor_all(self) -> Tensor:
        logits, targets = self.logits, self.targets
        size, outputs = logits.shape[0], self.outputs
        with torch.enable_grad():
            leaf = logits.clone().requires_grad_()
            loss = self.loss.loss_fn(leaf, targets)
            _require_scalar(loss)
            (gradient,) = torch.autograd.grad(loss * size, leaf, create_graph=True, allow_unused=True)
            if gradient is None or not gradient.requires_grad:  # linear (or constant) in the outputs
                return torch.zeros(size, outputs, *logits.shape[1:], dtype=logits.dtype, device=logits.device)

            def hessian_times(tangents: Tensor) -> Tensor:  # [k, N, *out] -> [k, N, *out]
                try:
                    (out,) = torch.autograd.grad(
                        gradient, leaf, tangents, retain_graph=True, is_grads_batched=True, allow_unused=True
                    )
                except RuntimeError:
                    out = torch.stack([torch.autograd.grad(gradient, leaf, t, retain_graph=True)[0] for t in tangents])
                return torch.zeros_like(tangents) if out is None else out

            self._check_separable(hessian_times, leaf)
            # tangent e: the unit vector e in every example's slot; block-diagonal, so column e of each block
            columns = []
            step = max(1, _ELEMENTS_PER_TANGENT_CHUNK // max(logits.numel(), 1))
            eye = torch.eye(outputs, dtype=logits.dtype, device=logits.device)
            for start in range(0, outputs, step):
                units = eye[start : start + step]  # [k, E]
                tangents = units[:, None, :].expand(-1, size, -1).reshape(-1, *logits.shape)
                columns.append(hessian_times(tangents).reshape(len(units), size, outputs).detach())
        blocks = torch.cat(columns).permute(1, 2, 0)  # [N, E (rows), E (columns)]
        blocks = (blocks + blocks.transpose(1, 2)) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(blocks)
        largest = eigenvalues.abs().amax(dim=1, keepdim=True)
        tolerance = 1e-6 if logits.dtype == torch.float64 else 1e-3
        if bool((eigenvalues < -tolerance * largest.clamp(min=torch.finfo(logits.dtype).tiny)).any()):
            raise ValueError(
                f"loss_fn {_describe(self.loss.loss_fn)} is not convex in the model's outputs: its Hessian in "
                f"the outputs has a negative eigenvalue ({float(eigenvalues.min()):.3g}), so the generalized "
                "Gauss-Newton matrix is not a curvature estimate (it is indefinite). Use Hutchinson() or "
                "ExactHessian(), which differentiate the loss itself."
            )
        rows = (eigenvectors * eigenvalues.clamp(min=0).sqrt()[:, None, :]).transpose(1, 2)  # [N, E, E]
        return rows.reshape(size, outputs, *logits.shape[1:])

    def _check_separable(self, hessian_times: Callable[[Tensor], Tensor], leaf: Tensor) -> None:
        """A random tangent on the even examples must move the gradient of no odd example."""
        size = leaf.shape[0]
        if size < 2:
            return
        generator = torch.Generator(device=leaf.device).manual_seed(0)
        tangent = torch.randn(leaf.shape, generator=generator, device=leaf.device, dtype=leaf.dtype)
        tangent[1::2] = 0
        product = hessian_times(tangent[None])[0]
        leak = product[1::2].norm()
        if bool(leak > 1e-6 * product.norm() + torch.finfo(leaf.dtype).tiny):
            raise ValueError(
                f"loss_fn {_describe(self.loss.loss_fn)} couples the examples of a batch (its Hessian in the "
                "outputs is not block-diagonal over examples), so the per-example estimators (GGN, "
                "MonteCarloGGN, EmpiricalFisher) do not apply. Use Hutchinson() or ExactHessian()."
            )
