"""Membership inference on the forget set: did unlearning make ``D_f`` look like data never trained on?

The attack follows the loss/confidence evaluations of SalUn and SSD. Every sample gets two
features from the model's output: its loss ``−log p_y`` and the entropy of its predicted
distribution. A logistic-regression attacker learns members (retain samples, label 1) against
non-members (test samples, label 0) on one half of a balanced set; its ROC AUC on the other half
says how strong it is (0.5: no signal). Applied to the forget set, it gives the **MIA efficacy**:
the fraction of ``D_f`` predicted as non-members. A model retrained without ``D_f`` sets the target.

The decision threshold is the median attacker score on its own (balanced) training half, so with
no signal a sample from any distribution is called a member with probability one half.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.evaluations.base import Evaluation
from lightning_sa_unlearn.functional import batches_for, eval_mode

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


@torch.no_grad()
def attack_features(model: nn.Module, batches: Iterable[Any], max_samples: int | None = None) -> Tensor:
    """``[loss, entropy]`` per sample (N×2, float64) of ``model``'s softmax output, in eval mode."""
    rows: list[Tensor] = []
    count = 0
    with eval_mode(model):
        for x, y in batches_for(model, batches):
            log_p = F.log_softmax(model(x).double(), dim=1)  # [B, C] or [B, C, positions...]
            valid = y >= 0  # negative labels are padding the loss ignores
            loss = _per_example(-log_p.gather(1, y.clamp(min=0)[:, None]).squeeze(1), valid)
            entropy = _per_example(-(log_p.exp() * log_p).sum(dim=1), valid)
            rows.append(torch.stack([loss, entropy], dim=1).cpu())
            count += len(y)
            if max_samples is not None and count >= max_samples:
                break
    features = torch.cat(rows) if rows else torch.empty(0, 2, dtype=torch.float64)
    return features[:max_samples]


def _per_example(values: Tensor, valid: Tensor) -> Tensor:
    """The mean over the positions (pixels, tokens) of each example that are not padding; ``[B]`` stays as it is."""
    mask = valid.reshape(values.shape[0], -1).to(values.dtype)
    return (values.reshape(values.shape[0], -1) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def fit_logistic_regression(features: Tensor, labels: Tensor, l2: float = 1e-4, max_iter: int = 100) -> Tensor:
    """Weights ``w`` (last entry: the bias) minimizing mean log-loss of ``σ([X, 1] w)`` plus ``l2·|w|²/2``.

    Features are used as given; standardize them first. L-BFGS in float64.
    """
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    y = labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach()


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half.

    The Mann-Whitney statistic from average ranks: ``(Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋)``,
    in O(n log n) time and O(n) memory.
    """
    positives = labels.bool()
    n_positive, n_negative = int(positives.sum()), int((~positives).sum())
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based, ties share their mean rank
    rank_sum = float(average_rank[positives].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def membership_inference(
    model: nn.Module,
    retain: Iterable[Any],
    test: Iterable[Any],
    forget: Iterable[Any],
    *,
    max_samples: int = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """Train the attacker on ``retain`` (members) against ``test`` (non-members); apply it to ``forget``.

    Returns ``forget_non_member_rate`` (the MIA efficacy), ``forget_member_probability`` (the mean
    attacker probability on ``D_f``), ``attacker_auc`` and ``attacker_accuracy`` on the attacker's
    held-out half, and ``attacker_samples`` (members plus non-members it was trained on).
    At most ``max_samples`` retain and test samples are read; the two are balanced.
    """
    members, non_members = attack_features(model, retain, max_samples), attack_features(model, test, max_samples)
    targets = attack_features(model, forget)
    n = min(len(members), len(non_members))
    if n < 4 or len(targets) == 0:
        raise ValueError(
            f"membership inference needs at least 4 retain and 4 test samples and a non-empty forget set; "
            f"got {len(members)} retain, {len(non_members)} test and {len(targets)} forget samples."
        )
    generator = torch.Generator().manual_seed(seed)
    members = members[torch.randperm(len(members), generator=generator)[:n]]
    non_members = non_members[torch.randperm(len(non_members), generator=generator)[:n]]
    half = n // 2
    train_x = torch.cat([members[:half], non_members[:half]])
    train_y = torch.cat([torch.ones(half), torch.zeros(half)])
    held_x = torch.cat([members[half:], non_members[half:]])
    held_y = torch.cat([torch.ones(n - half), torch.zeros(n - half)])

    # log1p compresses the heavy tail of the loss; then standardize on the attacker's training half
    def transform(z: Tensor) -> Tensor:
        return z.clamp(min=0).log1p()

    mean, std = transform(train_x).mean(0), transform(train_x).std(0).clamp(min=1e-12)
    weights = fit_logistic_regression((transform(train_x) - mean) / std, train_y)

    def score(z: Tensor) -> Tensor:
        return ((transform(z) - mean) / std) @ weights[:-1] + weights[-1]

    threshold = score(train_x).median()
    held_scores = score(held_x)
    target_scores = score(targets)
    return {
        "forget_non_member_rate": float((target_scores <= threshold).double().mean()),
        "forget_member_probability": float(torch.sigmoid(target_scores).mean()),
        "attacker_auc": roc_auc(held_scores, held_y),
        "attacker_accuracy": float(((held_scores > threshold).double() == held_y).double().mean()),
        "attacker_samples": float(2 * half),
    }


class MembershipInference(Evaluation):
    """Membership inference on ``D_f`` before and after (:func:`membership_inference`).

    Args:
        samples: at most this many retain (member) and test (non-member) samples train the attacker.
    """

    key = "membership_inference"

    def __init__(self, samples: int = 5000) -> None:
        if samples < 4:
            raise ValueError(f"samples must be >= 4 (the attacker needs two of each kind per half), got {samples}.")
        self.samples = samples

    def check(self, run: RunContext) -> None:
        if run.data.retain is None or run.data.test is None:
            raise ValueError(
                "MembershipInference needs retain_dataloader() (members) and test_dataloader() (non-members)."
            )

    def measure(self, run: RunContext) -> dict[str, float]:
        data = run.data
        retain, test, forget = (
            run.whole(data.retain, "retain"),
            run.whole(data.test, "test"),
            run.whole(data.forget, "forget"),
        )
        return run.processes.on_rank_zero(
            lambda: membership_inference(run.model, retain, test, forget, max_samples=self.samples, seed=run.seed)
        )

    def report_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return {"membership_inference": results}
