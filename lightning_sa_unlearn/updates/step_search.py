"""A step-size search that costs a few forward passes over a validation subset sized by its own noise.

Along a fixed direction ``d`` the validation objective ``L(τ) = mean ℓ(θ − τ·d)`` is evaluated
at ``τ = 0`` and at a handful of points of a golden-section search on ``log τ`` over the range of
the update's default grid. The best point found is then compared with ``τ = 0`` by the paired
per-sample difference ``D_i = ℓ_i(τ) − ℓ_i(0)``: while ``|mean D| ≤ z·SE(mean D)`` the subset doubles,
up to the validation set's size. ``τ = 0`` (no update) is kept unless the step is better beyond noise
or the whole subset says it is better on average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_sa_unlearn.data import limit_samples
from lightning_sa_unlearn.functional import batches_for
from lightning_sa_unlearn.objective.losses import sample_losses, standard_error
from lightning_sa_unlearn.objective.stored_features import Recorder, StoredFeatures

if TYPE_CHECKING:
    from lightning_sa_unlearn.objective.validation import ValidationObjective
    from lightning_sa_unlearn.processes import Processes

GOLDEN = (math.sqrt(5) - 1) / 2


def paired_difference(processes: Processes, after: list[Tensor], before: list[Tensor]) -> tuple[float, float]:
    """``(mean, standard error)`` of the objective's change, summed over its terms, across every process.

    Each term is a mean over its own samples, so ``SE² = Σ_t Var_t(D) / n_t``.
    """
    mean, variance = 0.0, 0.0
    for a, b in zip(after, before):
        d = a - b
        sums = processes.sum(torch.tensor([d.sum(), (d * d).sum(), float(len(d))], dtype=torch.float64))
        total, squares, n = sums.tolist()
        if n == 0:
            continue
        mean += total / n
        variance += standard_error(n, total, squares) ** 2 if n >= 2 else 0.0
    return mean, math.sqrt(variance)


class SubsetObjective:
    """The validation objective's terms on their first ``samples`` samples, held on the model's device.

    Where the model splits below the selection (:class:`StoredFeatures`), the frozen layers' outputs are
    held instead of the inputs, and each evaluation runs the layers above only.
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], objective: ValidationObjective, record: Recorder
    ) -> None:
        self.model, self.names, self.record, self.objective = model, list(names), record, objective
        self.loss_fn, self.processes, self.sources = objective.loss_fn, objective.processes, objective.terms
        self.sizes = [0] * len(self.sources)
        self.batches: list[list[Any]] = [[] for _ in self.sources]
        self.features: StoredFeatures | None = None
        self.stored: list[list[Any] | None] = [None] * len(self.sources)

    def grow(self, samples: int) -> bool:
        """Use the first ``samples`` samples of each term (per process: a share); False if nothing was added."""
        local = math.ceil(samples / self.processes.world_size)
        grew = False
        for t, source in enumerate(self.sources):
            if t == 0 and self.names:  # the validation term: the objective's shared split and store
                batches, self.features, stored = self.objective.stored(self.model, self.names, samples, self.record)
            else:
                batches, stored = list(batches_for(self.model, limit_samples(source, local))), None
            size = sum(len(y) for _, y in batches)
            if size > self.sizes[t]:
                grew = True
                self.batches[t], self.sizes[t] = batches, size
                if t > 0 and self.features is not None:  # the relabelled forget term's own store
                    self.features.release(self.stored[t])
                    stored = self.features.store(batches)
                self.stored[t] = stored
        return grew

    def losses(self) -> list[Tensor]:
        def measure() -> list[Tensor]:
            if self.features is None:
                return [sample_losses(self.model, b, self.loss_fn).losses for b in self.batches]
            return [each.losses for each in self.features.losses(self.batches, self.stored, self.loss_fn)]

        return self.processes.agree(measure)

    def value(self, losses: list[Tensor]) -> float:
        """``Σ_t mean_i ℓ_i`` across every process."""
        return sum(self.processes.mean(float(values.sum()), len(values)) for values in losses)


def golden_section(evaluate: Callable[[float], float], low: float, high: float, evaluations: int) -> None:
    """Golden-section minimisation of ``evaluate`` over ``[low, high]`` with ``evaluations`` calls (>= 2)."""
    a, b = low, high
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    for _ in range(evaluations - 2):
        if fc <= fd or math.isnan(fd):
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = evaluate(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = evaluate(d)


def search_tau(
    model: nn.Module,
    names: Sequence[str],
    validation: ValidationObjective,
    move: Callable[[float], None],
    grid: Sequence[float],
    *,
    record: Recorder,
    first_samples: int,
    max_samples: int,
    evaluations: int,
    z: float,
) -> tuple[float, dict[float, float], int]:
    """``(τ, {τ: objective on the search subset}, validation samples used)``; ``move(τ)`` sets ``θ − τ·d``."""
    positive = sorted(t for t in grid if t > 0)
    objective = SubsetObjective(model, names, validation, record)
    objective.grow(min(first_samples, max_samples))
    move(0.0)
    at_zero = objective.losses()
    tried = {0.0: objective.value(at_zero)}
    if not positive:
        return 0.0, tried, sum(objective.sizes)
    per_sample: dict[float, list[Tensor]] = {}

    def evaluate(log_tau: float) -> float:
        tau = 10.0**log_tau
        move(tau)
        per_sample[tau] = objective.losses()
        tried[tau] = objective.value(per_sample[tau])
        return tried[tau] if math.isfinite(tried[tau]) else math.inf

    low, high = math.log10(positive[0]), math.log10(positive[-1])
    if low == high or evaluations < 2:
        evaluate(high)
    else:
        golden_section(evaluate, low, high, evaluations)
    finite = {t: v for t, v in tried.items() if t > 0 and math.isfinite(v)}
    if not finite:
        return 0.0, tried, sum(objective.sizes)
    best = min(finite, key=finite.get)
    after = per_sample[best]
    mean, error = paired_difference(validation.processes, after, at_zero)
    samples = min(first_samples, max_samples)
    while abs(mean) <= z * error and samples < max_samples:  # within noise: look at more samples
        samples = min(2 * samples, max_samples)
        if not objective.grow(samples):
            break
        move(0.0)
        at_zero = objective.losses()
        move(best)
        after = objective.losses()
        mean, error = paired_difference(validation.processes, after, at_zero)
    return (best if mean < 0 else 0.0), tried, sum(objective.sizes)
