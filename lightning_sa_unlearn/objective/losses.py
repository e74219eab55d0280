"""Per-sample validation losses and correctness, and the standard errors of their means (the harm guard's and
the step-size search's measurements)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode


def standard_error(count: float, total: float, squares: float) -> float:
    """Standard error of a mean from ``(n, Σx, Σx²)`` (sums that add up across processes); NaN for n < 2."""
    if count < 2:
        return float("nan")
    mean = total / count
    variance = max(squares - count * mean * mean, 0.0) / (count - 1)
    return math.sqrt(variance / count)


def paired_standard_error(before: Tensor, after: Tensor) -> float:
    """Standard error of ``mean(after − before)`` over samples measured twice, in the same order.

    ``before`` and ``after`` hold one value per sample (e.g. per-sample losses before and after an
    update). NaN with fewer than two samples.
    """
    if before.shape != after.shape:
        raise ValueError(f"paired values need the same shape, got {tuple(before.shape)} and {tuple(after.shape)}.")
    return standard_error(*moments(after.double() - before.double()))


def per_sample_loss(loss_fn: LossFn, logits: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn`` on each sample of a batch (``loss_fn`` returns the mean over the batch); with positions
    (pixels, tokens), cross-entropy gives one loss per position, which the caller averages per sample."""
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(logits, targets, reduction="none")
    try:
        return torch.func.vmap(lambda z, t: loss_fn(z.unsqueeze(0), t.unsqueeze(0)))(logits, targets)
    except Exception:  # a loss that vmap cannot trace: one call per sample (cheap: no forward pass)
        return torch.stack([loss_fn(logits[i : i + 1], targets[i : i + 1]) for i in range(len(targets))])


@dataclass
class SampleLosses:
    """Per-sample losses (float64), labels and predicted classes of this process's samples, in order.

    ``correct`` (float64, one value per sample): 1 or 0 for a sample with one label; for per-position labels
    (pixels, tokens) the share of its positions not ignored whose predicted class is right, as ``losses``
    averages over those positions (0 for a sample whose positions are all ignored). ``labels`` and
    ``predicted`` hold one entry per position not ignored.
    """

    losses: Tensor
    labels: Tensor
    predicted: Tensor
    correct: Tensor


@torch.no_grad()
def sample_losses(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy) -> SampleLosses:
    """:class:`SampleLosses` of ``model`` on every sample of ``batches``, in eval mode (on the CPU)."""
    losses, labels, predicted, correct = [], [], [], []
    with eval_mode(model):
        for x, y in batches_for(model, batches):
            logits = model(x)
            valid = (y >= 0).reshape(len(y), -1)  # negative labels are padding the loss ignores
            per = per_sample_loss(loss_fn, logits, y).detach().double().reshape(len(y), -1)
            if per.shape == valid.shape:  # one loss per position: the mean over the positions not ignored
                per = _mean_over(per, valid)
            guess = logits.argmax(dim=1).reshape(len(y), -1)
            losses.append(per.mean(1).cpu())
            correct.append(_mean_over((guess == y.reshape(len(y), -1)).double(), valid).reshape(-1).cpu())
            labels.append(y.reshape(-1)[valid.reshape(-1)].cpu())
            predicted.append(guess.reshape(-1)[valid.reshape(-1)].cpu())
    if not losses:
        empty, none = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64)
        return SampleLosses(none, empty, empty, none)
    return SampleLosses(torch.cat(losses), torch.cat(labels), torch.cat(predicted), torch.cat(correct))


def _mean_over(values: Tensor, valid: Tensor) -> Tensor:
    """Per row, the mean of ``values`` over the positions ``valid`` marks (0 for a row with none), as ``[B, 1]``."""
    return (values * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)


def moments(values: Tensor) -> list[float]:
    """``[n, Σx, Σx²]`` of ``values``: sums that add up across processes."""
    return [float(values.numel()), float(values.sum()), float(values.square().sum())]


def paired_moments(before: Tensor, after: Tensor, same: bool) -> list[float]:
    """:func:`moments` of the paired differences ``after − before`` (none where the two passes served different
    samples, ``same`` False), then of ``before`` and of ``after``: nine sums."""
    difference = after - before if same else before.new_zeros(0)
    return [*moments(difference), *moments(before), *moments(after)]


def mean_change(sums: list[float], paired: bool) -> tuple[float, float, float]:
    """``(mean before, mean after, standard error of the change)`` from :func:`paired_moments` summed across
    processes; unpaired (the passes served different samples): the two standard errors combined."""
    (n_d, s_d, q_d), (n_b, s_b, q_b), (n_a, s_a, q_a) = sums[0:3], sums[3:6], sums[6:9]
    if paired:
        se = standard_error(n_d, s_d, q_d)
    else:
        se = math.sqrt(standard_error(n_b, s_b, q_b) ** 2 + standard_error(n_a, s_a, q_a) ** 2)
    return s_b / max(n_b, 1), s_a / max(n_a, 1), se
