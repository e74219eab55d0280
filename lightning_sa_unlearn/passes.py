"""What a run costs in sample passes: counted per stage, and priced against one plain gradient pass.

Unit (issue #13): a forward and backward pass over one sample is 1, a forward alone ``1/3``; training
for E epochs on N samples is ``E·N``. A run counts the samples through its model per stage
(:attr:`UnlearningRun.passes <lightning_sa_unlearn.context.UnlearningRun>`, the report's
``sample_passes``), by kind:

* ``forward_backward``: the whole model with gradients on (1 each);
* ``forward``: the whole model without gradients (``1/3``); also the frozen layers below a
  selection when their outputs are stored, counted as a whole forward;
* ``forward_above`` / ``forward_backward_above``: only the layers above the stored outputs
  (:class:`~lightning_sa_unlearn.objective.stored_features.StoredFeatures`), priced at the measured
  share ``s`` of a pass those layers take: ``s/3`` and ``s``.

Curvature passes are not plain ones (per-example squares, several backward passes, probes): their
samples are priced at the measured ratio of the estimator's seconds per sample to a gradient pass's.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sa_unlearn.counting import PASS_KINDS, UNLEARNING_STAGES, count_samples  # noqa: F401 (re-exported)
from lightning_sa_unlearn.data import limit_samples

PASS_UNITS = {"forward_backward": 1.0, "forward": 1 / 3}
"""Units per sample of the passes through the whole model."""
CURVATURE_STAGES = ("curvature", "curvature_report")


def stage_units(
    passes: dict[str, float], *, above_share: float | None = None, curvature_cost: float | None = None, samples: int = 0
) -> float:
    """Units of one stage's counted ``passes``; a curvature stage is ``samples × curvature_cost`` instead.

    ``above_share``: the share of a whole pass that the layers above the stored outputs take
    (:func:`above_share`); needed only when the stage counted such passes.
    """
    if curvature_cost is not None:
        return samples * curvature_cost
    total = sum(PASS_UNITS[kind] * n for kind, n in passes.items() if kind in PASS_UNITS)
    above = {k[: -len("_above")]: n for k, n in passes.items() if k.endswith("_above")}
    if above and above_share is None:
        raise ValueError(f"passes {passes} went through the layers above stored outputs: give above_share.")
    return total + sum(PASS_UNITS[kind] * n * above_share for kind, n in above.items())


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Timing runs the model as it is (train mode included); afterwards its buffers (BatchNorm's running
    statistics) are as before and its gradients cleared, so that timing never changes the model it prices."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        model.zero_grad(set_to_none=True)


def seconds_per_gradient_sample(model: nn.Module, batches: Iterable[Any], samples: int = 2048) -> float:
    """Median over 3 repeats of one forward+backward pass (cross-entropy), per sample, on the first ``samples``."""
    chosen = list(limit_samples(batches, samples))
    with _untouched(model):
        return _median_seconds(lambda: _gradient_pass(model, chosen)) / sum(len(y) for _, y in chosen)


def curvature_cost(
    model: nn.Module, batches: Iterable[Any], curvature: Any, samples: int = 1024, repeats: int = 5
) -> float:
    """Units of one curvature sample: seconds of ``curvature`` (a :class:`~lightning_sa_unlearn.curvature.Curvature`)
    over those of a plain gradient pass, on the same ``samples`` in memory, both in the estimator's own batches
    (``batch_size``; as ``benchmarks/curvature.py`` times them). The two are timed in turn and the median of the
    ``repeats`` ratios is returned, so that a machine that speeds up or slows down affects both alike.
    """
    chosen = list(limit_samples(batches, samples))
    x, y = torch.cat([x for x, _ in chosen]), torch.cat([y for _, y in chosen])
    size = getattr(curvature, "batch_size", None) or len(chosen[0][1])
    own = list(zip(x.split(size), y.split(size)))
    generator = torch.Generator().manual_seed(0)
    ratios = []
    with _untouched(model):
        for _ in range(repeats):
            measured = _median_seconds(
                lambda: curvature.diagonal_sum(model, own, loss_fn=F.cross_entropy, generator=generator), repeats=1
            )
            ratios.append(measured / _median_seconds(lambda: _gradient_pass(model, own), repeats=1))
    return statistics.median(ratios)


def _gradient_pass(model: nn.Module, batches: list[Any]) -> None:
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()


def above_share(model: nn.Module, below: nn.Module, above: nn.Module, x: torch.Tensor) -> float:
    """Seconds of a forward+backward through ``above`` on ``below(x)`` over those through the whole model (medians).
    ``below`` and ``above`` hold ``model``'s own modules (as :func:`split_below` returns them)."""

    def timed(forward: nn.Module, inputs: torch.Tensor) -> float:
        return _median_seconds(lambda: forward(inputs).logsumexp(1).sum().backward(), repeats=5)

    with _untouched(model):
        with torch.no_grad():
            features = below(x)
        return timed(above, features) / timed(model, x)


def unlearning_units(
    report: Any, model: nn.Module, batches: Iterable[Any], curvature: Any, stages: Sequence[str] | None = None
) -> dict[str, float]:
    """Units of each stage of the unlearning itself in ``report`` (an :class:`UnlearningReport`).

    Counted passes (``sample_passes``); the layers above stored outputs at their timed share of a pass;
    curvature as ``curvature_samples`` times the timed cost of ``curvature`` (the estimator the run used).
    ``model``: the fitted model, before unlearning; ``batches``: training batches to time on (in memory).
    Approximations: passes above stored outputs are priced at the share of the final selection's split (a
    trial rule's candidates had their own); under several processes, curvature units read in a round past
    the stopping one are counted in ``sample_passes`` but not priced here.
    """
    from lightning_sa_unlearn.objective.stored_features import split_below

    chosen = list(limit_samples(batches, 2048))
    share = None
    if any(kind.endswith("_above") for kinds in report.sample_passes.values() for kind in kinds):
        names = [
            n for n, _ in model.named_parameters() if any(n.startswith(f"{layer}.") for layer in report.selected_layers)
        ]
        split = split_below(model, names, chosen[0][0])
        if split is None:
            raise ValueError(
                f"the model does not split below {report.selected_layers}, yet the report counted such passes."
            )
        share = above_share(model, split[0], split[1], chosen[0][0])
    units = {}
    for stage in stages or UNLEARNING_STAGES:
        passes = report.sample_passes.get(stage, {})
        if stage in CURVATURE_STAGES:
            cost = curvature_cost(model, chosen, curvature) if passes else 0.0
            units[stage] = stage_units(passes, curvature_cost=cost, samples=report.curvature_samples)
        else:
            units[stage] = stage_units(passes, above_share=share)
    return units


def _median_seconds(work: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
