"""Reading curvature batches until the selection is confident, with the same samples on any number of processes.

The training set is cut into seeded random units of ``batch_size`` samples
(:func:`~lightning_sa_unlearn.data.sample_units`). The first round reads ``min_batches`` units; every
later round reads one unit per process (for probe-parallel estimators, all processes read the same
unit with their own probes). The per-unit layer sums are all-reduced, and the stopping rule is
applied after each unit in order, from the ``min_batches``-th on: reading stops at the first unit
where the pick leads the runner-up by ``confidence`` standard errors, and units that a round read
past it are dropped. So one process and several keep the same units and stop at the same one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_sa_unlearn.curvature.confidence import SharpnessStatistics
from lightning_sa_unlearn.data import dataset_size, unit_batch
from lightning_sa_unlearn.functional import tree_add_

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


def read_until_confident(
    estimator: Any,
    run: RunContext,
    units: list[Tensor],
    confident: Callable[[SharpnessStatistics], bool] | None,
) -> tuple[dict[str, Tensor] | None, int, SharpnessStatistics, str]:
    """``(this process's diagonal sum, its samples, statistics of the kept units, why reading stopped)``."""
    processes, model, loader = run.processes, run.model, run.data.train
    statistics = SharpnessStatistics(model)
    generator = torch.Generator(device=run.device).manual_seed(run.seed + 7919 * processes.rank)
    copies = processes.world_size if estimator.probe_parallel else 1
    per_round = 1 if estimator.probe_parallel else processes.world_size
    progress = iter(run.progress(range(len(units)), f"curvature ({estimator.name})", len(units)))
    total, count, start, stop = None, 0, 0, "data exhausted"
    while start < len(units):
        chunk = units[start : start + (estimator.min_batches if start == 0 else per_round)]
        rows = torch.zeros(len(chunk), len(statistics.names), dtype=torch.float64)
        mine = (
            range(len(chunk)) if estimator.probe_parallel else range(processes.rank, len(chunk), processes.world_size)
        )

        def read() -> dict[int, tuple[dict[str, Tensor], int]]:
            # the first round is kept whole (the rule cannot stop before its last unit): one running sum;
            # later rounds hold one unit per process until the rule says whether it is kept
            parts: dict[int, tuple[dict[str, Tensor], int]] = {}
            for i in mine:
                batch = run.batches([unit_batch(loader, chunk[i])], "training", rank=0, world_size=1)
                # data-parallel: a unit's random draws depend on the unit, not on who reads it
                copy = processes.rank if estimator.probe_parallel else 0
                generator.manual_seed(run.seed + 7919 * copy + 104729 * (start + i + 1))
                part, n = estimator.diagonal_sum(model, batch, loss_fn=run.loss_fn, generator=generator)
                if part is not None:
                    rows[i] = statistics.layer_sums(part)
                    if start == 0 and 0 in parts:
                        parts[0] = (tree_add_(parts[0][0], part), parts[0][1] + n)
                    else:
                        parts[0 if start == 0 else i] = (part, n)
            return parts

        parts = processes.agree(read)
        averaged = processes.sum(rows).cpu() / copies
        kept = len(chunk)
        for i, unit in enumerate(chunk):
            statistics.record(averaged[i], len(unit))
            next(progress, None)
            if start + i + 1 >= estimator.min_batches and confident is not None and confident(statistics):
                kept, stop = i + 1, "confident"
                break
        for i in range(kept):
            if i in parts:
                total, count = tree_add_(total, parts[i][0]), count + parts[i][1]
        start += len(chunk)
        if stop == "confident":
            break
    else:
        if sum(len(u) for u in units) < (dataset_size(loader) or 0):
            stop = "maximum reached"
    return total, count, statistics, stop
