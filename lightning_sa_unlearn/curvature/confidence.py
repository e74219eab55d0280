"""How sure the per-layer sharpness is: standard errors over batches, and the selection's margin.

Every curvature method estimates the mean diagonal as a sum over batches. A batch ``b`` of
``n_b`` samples adds ``y_bl = (1/|θ_l|) Σ_{i∈θ_l} D_b,i`` to layer ``l``, so the layer's mean is the
ratio ``m_l = Σ_b y_bl / Σ_b n_b``. Treating batches as independent replicates (each has its own
samples, and its own probes or sampled labels), the ratio estimator's standard error is

    SE(m_l)² = B/(B−1) · Σ_b (y_bl − m_l n_b)² / (Σ_b n_b)²,

with B batches. It covers the Monte-Carlo noise of ``hutchinson`` and ``mc_ggn`` and the noise of
measuring on ``curvature_samples`` rather than the whole training set. Only sums enter it
(``Σ y``, ``Σ y yᵀ``, ``Σ y n``, ``Σ n``, ``Σ n²``, ``B``), so processes combine their shards by adding.
The same formula on ``y_bl − y_bk`` gives the standard error of the difference of two layers,
which is what decides whether the selected layer really leads the runner-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sa_unlearn.curvature.functional import hessian_diagonal_sum
from lightning_sa_unlearn.processes import SummedState
from lightning_sa_unlearn.selection.functional import (  # noqa: F401 (selection_margin: re-exported)
    selection_margin,
    trainable_layers,
)


class SharpnessStatistics(SummedState):
    """Accumulates per-batch layer sums of a diagonal estimate (``on_batch`` of :func:`hessian_diagonal_sum`);
    every sum adds up across processes (:meth:`sync`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = trainable_layers(model)
        self.names = list(self.layers)
        sizes = dict(model.named_parameters())
        self.sizes = torch.tensor(
            [sum(sizes[n].numel() for n in ps) for ps in self.layers.values()], dtype=torch.float64
        )
        size = len(self.names)
        for name, shape in (("sum_y", (size,)), ("sum_yy", (size, size)), ("sum_yn", (size,))):
            self.add_state(name, shape)
        for name in ("sum_n", "sum_nn", "batches"):
            self.add_state(name)

    def update(self, part: dict[str, Tensor], size: int) -> None:
        """Record one batch: ``part`` is its summed diagonal ``{name: Σ_n diag_n}``, ``size`` its samples."""
        self.record(self.layer_sums(part), size)

    def layer_sums(self, part: dict[str, Tensor]) -> Tensor:
        """``y_l = (1/|θ_l|) Σ_{i∈θ_l} part_i`` for every layer (float64, on the CPU)."""
        sums = [sum(part[n].detach().double().sum().cpu() for n in names) for names in self.layers.values()]
        return torch.stack(sums) / self.sizes

    def record(self, y: Tensor, size: int) -> None:
        """Record one batch from its layer sums ``y`` (:meth:`layer_sums`) and its number of samples."""
        y = y.double().cpu()
        self.state["sum_y"] += y
        self.state["sum_yy"] += torch.outer(y, y)
        self.state["sum_yn"] += y * size
        self.state["sum_n"] += size
        self.state["sum_nn"] += size * size
        self.state["batches"] += 1

    def means(self) -> dict[str, float]:
        """Each layer's mean diagonal, equal to :func:`layer_sharpness` of the accumulated diagonal."""
        return dict(zip(self.names, (self.state["sum_y"] / self.state["sum_n"]).tolist()))

    def _standard_error(self, weights: Tensor) -> float:
        """SE of ``Σ_l w_l m_l`` (one layer: a unit vector; a difference: +1 and −1)."""
        s = self.state
        batches, total = float(s["batches"]), float(s["sum_n"])
        if batches < 2:
            return float("nan")
        mean = float(weights @ s["sum_y"]) / total
        sum_squares = float(weights @ s["sum_yy"] @ weights) - 2 * mean * float(weights @ s["sum_yn"])
        sum_squares += mean**2 * float(s["sum_nn"])
        return math.sqrt(max(sum_squares, 0.0) * batches / (batches - 1)) / total

    def standard_errors(self) -> dict[str, float]:
        """``{layer: SE of its mean diagonal}`` (NaN with fewer than two batches)."""
        eye = torch.eye(len(self.names), dtype=torch.float64)
        return {name: self._standard_error(eye[i]) for i, name in enumerate(self.names)}

    def difference_standard_error(self, first: str, second: str) -> float:
        """SE of ``m_first − m_second``, with the two layers' batch-to-batch correlation accounted for."""
        weights = torch.zeros(len(self.names), dtype=torch.float64)
        weights[self.names.index(first)] += 1.0
        weights[self.names.index(second)] -= 1.0
        return self._standard_error(weights)


def sharpness_with_standard_errors(
    model: nn.Module, batches: Iterable[Any], **curvature: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """``(layer sharpness, its standard errors)`` from one :func:`hessian_diagonal_sum` pass (same keywords)."""
    statistics = SharpnessStatistics(model)
    hessian_diagonal_sum(model, batches, on_batch=statistics.update, **curvature)
    if float(statistics.state["sum_n"]) == 0:
        raise ValueError("sharpness_with_standard_errors got no samples: `batches` is empty.")
    return statistics.means(), statistics.standard_errors()


@dataclass
class CurvatureResult:
    """What a curvature pass measured: the diagonal, the samples it read (once each), batch statistics.

    ``stop`` says why reading stopped: ``"confident"`` (the selection's lead reached ``confidence``
    standard errors), ``"maximum reached"``, ``"data exhausted"``, ``"fixed count"`` (``samples`` was
    given) or ``"report only"`` (no part needed curvature; a small sample for the report).
    """

    diagonal: dict[str, Tensor]
    samples: int
    statistics: SharpnessStatistics
    stop: str = "fixed count"
    notes: list[str] = field(default_factory=list)
    """What the estimate is not (:meth:`Curvature.notes`); the report's ``curvature_notes``."""
