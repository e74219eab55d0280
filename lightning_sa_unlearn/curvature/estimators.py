"""Curvature estimators as parts: each holds its own settings and says how it runs on several processes.

Every estimator returns ``diag H`` of the MEAN training loss (paper eq. 2 divided by N, section 4.1)
over at most ``samples`` training samples. The maths is in :mod:`~lightning_sa_unlearn.curvature.functional`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_sa_unlearn.curvature.confidence import CurvatureResult, SharpnessStatistics
from lightning_sa_unlearn.curvature.functional import (
    EXACT_MAX_PARAMETERS,
    MAX_CLASSES,
    hessian_diagonal_sum,
    sum_over_batches,
)
from lightning_sa_unlearn.curvature.losses import output_loss
from lightning_sa_unlearn.curvature.second_derivatives import _Choice
from lightning_sa_unlearn.curvature.sequential import read_until_confident
from lightning_sa_unlearn.curvature.smooth import SMOOTH_MODULES, smooth_modules  # noqa: F401 (re-exported)
from lightning_sa_unlearn.data import dataset_size, sample_units, sized
from lightning_sa_unlearn.functional import LossFn, trainable_parameters

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


DEFAULT_MAX_SAMPLES = 10_000
"""The most a sequential pass reads by default: 10,000 picked the same layer as all 50,000 MNIST images in 5 of 5
seeds (``benchmarks/results/curvature_seeds.md``)."""
SMALL_DATA_SHARE = 40
"""A sequential pass's fewest samples (``min_batches`` batches) are at most 1/40 of a small training set."""
MAX_SHARE = 4
"""By default a sequential pass reads at most a quarter of the training set."""


class Curvature:
    """Base class: an estimate of ``diag ∇²_θ (1/N) Σ_n ℓ(h(x_n, θ), y_n)`` on the training set.

    A new estimator overrides :meth:`batch_sum` (the sum over one batch of ``diag ∇²ℓ_n``); the base
    class reads the data, sums across processes and keeps per-batch statistics for standard errors.

    By default it reads batches in a seeded random order until the selection rule's pick leads the
    runner-up by ``confidence`` standard errors (:mod:`~lightning_sa_unlearn.curvature.confidence`),
    after at least ``min_batches`` batches and at most ``max_samples`` samples. Rules without such a
    margin read ``max_samples``. On a small training set of N samples the batches shrink to N/320
    (at least 16) and the pass reads at most N/4, so that its cost scales with the data (:meth:`scaled`).
    Under several processes every batch is read by one process and the decision is taken on the
    all-reduced statistics, so one process and several read the same samples.

    Args:
        samples: a fixed number of samples instead (``"all"``: every sample), read in one pass.
        max_samples: the most a sequential pass reads (None: :data:`DEFAULT_MAX_SAMPLES`, or a quarter of a
            smaller training set, with batches scaled down too: :meth:`scaled`).
        confidence: the lead, in standard errors, at which a sequential pass stops.
        min_batches: the fewest batches a sequential pass reads; from then on it checks after every batch
            (:mod:`~lightning_sa_unlearn.curvature.sequential`).
        batch_size: samples per batch of a sequential pass (None: the training loader's); 8 batches of
            64 give the standard errors 7 degrees of freedom from 512 samples.
        damping: λ of ``H + λI`` wherever the curvature is inverted (the second-order solve, eq. 12,
            and the Newton decrement), unless ``SecondOrder(damping=...)`` or ``NewtonDecrement(damping=...)``
            sets it where it is read: prefer those; this one stays for existing configs.
        chunk_size: examples (or probes, or basis vectors) vectorised at once; bounds memory.
    """

    method: ClassVar[str | None] = None
    """The :func:`~lightning_sa_unlearn.hessian_diagonal` method of a built-in; None for a custom estimator."""
    probe_parallel: ClassVar[bool] = False
    """False: processes split the data (data-parallel). True: every process reads all of it with its own
    random probes, and the estimates are averaged (more processes, less variance)."""
    gauss_newton: ClassVar[bool] = False
    """True for estimates of the Gauss-Newton matrix, which is the Hessian only for piecewise-linear models."""

    def __init__(
        self,
        samples: int | Literal["all"] | None = None,
        max_samples: int | None = None,
        confidence: float = 3.0,
        min_batches: int = 8,
        batch_size: int | None = 64,
        damping: float = 1e-3,
        chunk_size: int = 32,
    ) -> None:
        if samples is not None and samples != "all" and not (isinstance(samples, int) and samples >= 1):
            raise ValueError(f"samples must be >= 1, 'all' or None (read until confident), got {samples!r}.")
        if max_samples is not None and max_samples < 1 or min_batches < 1 or not confidence > 0:
            raise ValueError(
                "max_samples and min_batches must be >= 1 and confidence > 0; got "
                f"{max_samples}, {min_batches}, {confidence}."
            )
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}; it is the λ of (H + λI).")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (the loader's), got {batch_size}.")
        self.samples, self.max_samples, self.confidence = samples, max_samples, confidence
        self.min_batches, self.batch_size = min_batches, batch_size
        self.damping, self.chunk_size = damping, chunk_size

    @property
    def name(self) -> str:
        """The name in the report."""
        return self.method or type(self).__name__

    _path: _Choice | None = None
    """During :meth:`measure`, the computation path chosen on the first unit (not a setting)."""

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`hessian_diagonal_sum` for a built-in."""
        return {"chunk_size": self.chunk_size}

    def notes(self, model: nn.Module) -> list[str]:
        """What this estimate is not, for ``model``; each note is warned and recorded in the report.

        A Gauss-Newton estimator on a model with smooth nonlinearities (:data:`SMOOTH_MODULES`, found
        by module type) says that it measures the Gauss-Newton part of the Hessian only.
        """
        smooth = smooth_modules(model) if self.gauss_newton else []
        if not smooth:
            return []
        return [
            f"{self.name} is the Gauss-Newton part of the Hessian only: the model has smooth nonlinearities "
            f"({', '.join(smooth)}), whose own curvature the GGN leaves out, so the diagonal and the ranking "
            "of layers can differ from the Hessian's (the paper's quantity). Hutchinson() estimates the true "
            "Hessian diagonal. Only nn.Module layers are detected: functional calls in forward such as "
            "F.gelu or torch.tanh are not."
        ]

    def batch_sum(
        self, model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``Σ_{n ∈ batch} diag ∇²_θ ℓ(h(x_n, θ), y_n)`` for every trainable parameter (override this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement batch_sum(model, x, y, loss_fn=, generator=).")

    def diagonal_sum(
        self,
        model: nn.Module,
        batches: Any,
        *,
        loss_fn: LossFn,
        generator: torch.Generator,
        on_batch: Callable[[dict[str, Tensor], int], None] | None = None,
    ) -> tuple[dict[str, Tensor] | None, int]:
        """``(Σ_n diag ∇²ℓ_n, N)`` over ``batches`` on this process (None when it read no sample)."""
        if self.method is not None:
            return hessian_diagonal_sum(
                model,
                batches,
                loss_fn=loss_fn,
                method=self.method,
                generator=generator,
                on_batch=on_batch,
                path=self._path,
                **self.options(),
            )
        return sum_over_batches(
            model, batches, lambda x, y, *_: self.batch_sum(model, x, y, loss_fn=loss_fn, generator=generator), on_batch
        )

    def scaled(self, size: int | None) -> tuple[int | None, int]:
        """``(batch size, max samples)`` of a sequential pass on a training set of ``size`` samples. Unless
        ``max_samples`` is set: on a small set its first ``min_batches`` batches are at most
        1/:data:`SMALL_DATA_SHARE` of it (batches of at least 16) and it reads at most 1/:data:`MAX_SHARE` of it, so
        that the cost scales with the data."""
        if self.max_samples is not None:  # set by the user: read as told
            return self.batch_size, self.max_samples
        if size is None:
            return self.batch_size, DEFAULT_MAX_SAMPLES
        unit = self.batch_size
        if unit is not None:
            unit = min(unit, max(16, size // (SMALL_DATA_SHARE * self.min_batches)))
        return unit, min(DEFAULT_MAX_SAMPLES, max((unit or 1) * self.min_batches, size // MAX_SHARE))

    def measure(
        self, run: RunContext, confident: Callable[[SharpnessStatistics], bool] | None = None
    ) -> CurvatureResult:
        """Read the training set (see the class docstring); ``confident(statistics)`` decides when to stop."""
        self._path = _Choice()  # the first unit's checks choose the computation path for every later unit
        try:
            if self.samples is None:
                unit, limit = self.scaled(dataset_size(run.data.train))
                limit = run.capped(limit)
                units = sample_units(run.data.train, seed=run.seed, max_samples=limit, unit_size=unit)
                if units is not None:
                    return self._measure_sequentially(run, units, confident)
            samples = None if self.samples == "all" else self.samples or self.max_samples or DEFAULT_MAX_SAMPLES
            return self._measure_fixed(run, samples)
        finally:
            self._path = None

    def _measure_sequentially(
        self, run: RunContext, units: list[Tensor], confident: Callable[[SharpnessStatistics], bool] | None
    ) -> CurvatureResult:
        """Units until the selection is confident (:mod:`~lightning_sa_unlearn.curvature.sequential`)."""
        total, count, statistics, stop = read_until_confident(self, run, units, confident)
        return self._reduced(
            run, total, count, run.processes.world_size if self.probe_parallel else 1, statistics, stop
        )

    def _measure_fixed(self, run: RunContext, samples: int | None) -> CurvatureResult:
        """Per-process sums on disjoint shards, all-reduced (probe-parallel: averaged copies)."""
        processes, model = run.processes, run.model
        shard = dict(rank=0, world_size=1) if self.probe_parallel else {}
        train = run.batches(run.data.train, "training", samples, **shard)
        generator = torch.Generator(device=run.device).manual_seed(run.seed + 7919 * processes.rank)
        progress = run.progress(train, f"curvature ({self.name})", sized(train))
        statistics = SharpnessStatistics(model)
        # probe-parallel: every process reads the same batches, so a batch's estimates are averaged over the
        # processes and recorded once (recording each copy would count correlated replicates as independent)
        per_batch: list[tuple[Tensor, int]] = []
        parallel_probes = self.probe_parallel and processes.world_size > 1

        def on_batch(part: dict[str, Tensor], size: int) -> None:
            if parallel_probes:
                per_batch.append((statistics.layer_sums(part), size))
            else:
                statistics.update(part, size)

        local, count = processes.agree(
            lambda: self.diagonal_sum(model, progress, loss_fn=run.loss_fn, generator=generator, on_batch=on_batch)
        )
        if parallel_probes:
            sums = torch.stack([y for y, _ in per_batch]) if per_batch else torch.zeros(0, len(statistics.names))
            averaged = processes.sum(sums.to(torch.float64)).cpu() / processes.world_size
            for y, (_, size) in zip(averaged, per_batch):
                statistics.record(y, size)
        else:
            statistics.sync(processes)
        copies = processes.world_size if self.probe_parallel else 1
        return self._reduced(run, local, count, copies, statistics, "fixed count")

    def _reduced(
        self,
        run: RunContext,
        local: dict[str, Tensor] | None,
        count: int,
        copies: int,
        statistics: SharpnessStatistics,
        stop: str,
    ) -> CurvatureResult:
        """The all-reduced mean diagonal, checked to be finite."""
        processes = run.processes
        if local is None:
            local = {name: torch.zeros_like(p) for name, p in trainable_parameters(run.model).items()}
        total = processes.sum_tree(local)
        count = int(processes.sum(torch.tensor(float(count), dtype=torch.float64)))
        if count == 0:
            raise ValueError("the training set is empty: train_dataloader() served no samples for the curvature.")
        diag = {name: value / count for name, value in total.items()}  # count already holds every copy
        bad = [name for name, d in diag.items() if not torch.isfinite(d).all()]
        if bad:
            raise RuntimeError(
                f"the curvature of {bad} is not finite; the model's weights or data may "
                "hold NaN/inf. Weights were left unchanged."
            )
        notes = self.notes(run.model)
        for note in notes:
            rank_zero_warn(note)
        return CurvatureResult(diag, count // copies, statistics, stop, notes)

    def __repr__(self) -> str:
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


class GGN(Curvature):
    """The exact diagonal of the generalized Gauss-Newton matrix ``(1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n``.

    Equals ``diag H`` for networks piecewise linear in each layer (ReLU, max-pool, eval-mode
    BatchNorm); the Gauss-Newton part of it otherwise (a run then warns and notes it in the report).

    Args:
        max_classes: the exact GGN back-propagates one row per output entry (class, or class and
            position for per-pixel or per-token outputs); above this many it refuses and points to
            :class:`MonteCarloGGN`.
    """

    method = "ggn"
    gauss_newton = True

    def __init__(self, max_classes: int = MAX_CLASSES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {max_classes}.")
        self.max_classes = max_classes

    def options(self) -> dict[str, Any]:
        return {**super().options(), "max_classes": self.max_classes}


class MonteCarloGGN(Curvature):
    """Unbiased GGN diagonal from ``labels_per_example`` labels per example drawn from the model's softmax.

    Other identified losses (:mod:`~lightning_sa_unlearn.curvature.losses`) sample the factor of their
    output Hessian instead; it refuses a loss it cannot identify (use :class:`GGN`).
    """

    method = "mc_ggn"
    gauss_newton = True

    def __init__(self, labels_per_example: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if labels_per_example < 1:
            raise ValueError(f"labels_per_example must be >= 1, got {labels_per_example}.")
        self.labels_per_example = labels_per_example

    def options(self) -> dict[str, Any]:
        return {**super().options(), "num_samples": self.labels_per_example}


class Hutchinson(Curvature):
    """``E_z[z ⊙ Hz]`` with ``num_probes`` Rademacher probes per batch: unbiased, any smooth model.

    Probe-parallel under several processes: each reads all samples with probes of its own seed.
    """

    method = "hutchinson"
    probe_parallel = True

    def __init__(self, num_probes: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
        self.num_probes = num_probes

    def options(self) -> dict[str, Any]:
        return {**super().options(), "num_probes": self.num_probes}


class ExactHessian(Curvature):
    """``diag H`` from one Hessian-vector product per parameter: a reference for small models."""

    method = "exact"

    def __init__(self, max_parameters: int = EXACT_MAX_PARAMETERS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_parameters = max_parameters

    def options(self) -> dict[str, Any]:
        return {**super().options(), "exact_max_parameters": self.max_parameters}


class EmpiricalFisher(Curvature):
    """``(1/N) Σ_n (∇_θ ℓ(x_n, y_n))²`` at the given labels: cheap, biased away from a perfect fit."""

    method = "empirical_fisher"


def default_curvature(loss_fn: LossFn) -> Curvature:
    """The default estimator: ``MonteCarloGGN()``, which reached the default confidence on the same 512
    samples in 0.05 s against ``GGN()``'s 0.14 s on mnist_targeted (benchmarks/results/cost_mnist_targeted.md);
    ``GGN()`` for a loss with no distribution to sample labels from."""
    return MonteCarloGGN() if output_loss(loss_fn).samples_labels else GGN()


CURVATURES: dict[str, type[Curvature]] = {
    cls.method: cls
    for cls in (GGN, MonteCarloGGN, Hutchinson, ExactHessian, EmpiricalFisher)  # type: ignore[misc]
}
