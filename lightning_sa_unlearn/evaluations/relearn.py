"""The relearning attack: fine-tune an unlearned model on a few forget samples and see what comes back.

Paper section 4.1.1 argues that updating the flattest parameters resists this attack. The attack
works on a deep copy; the caller's model is never touched.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sa_unlearn.evaluations.base import Evaluation
from lightning_sa_unlearn.evaluations.metrics import ClassificationMetrics
from lightning_sa_unlearn.functional import LossFn, batches_for, concatenate, eval_mode, split_batch, take

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


def first_samples(batches: Iterable[Any], num_samples: int) -> tuple[Any, Tensor]:
    """The first ``num_samples`` ``(x, y)`` pairs of ``batches``, concatenated (the attacker's ``D'_f``)."""
    xs, ys, count = [], [], 0
    for batch in batches:
        x, y = split_batch(batch)
        xs.append(take(x, slice(num_samples - count)))
        ys.append(y[: num_samples - count])
        count += len(ys[-1])
        if count >= num_samples:
            break
    if count == 0:
        raise ValueError("the relearning attack needs at least one forget sample; the forget set is empty.")
    return concatenate(xs), torch.cat(ys)


def relearn_attack(
    model: nn.Module,
    relearn_set: tuple[Any, Tensor],
    *,
    steps: int = 10,
    lr: float = 1e-4,
    batch_size: int = 32,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` after ``steps`` SGD steps of its trainable parameters on ``relearn_set``.

    Trainable: ``requires_grad`` as the model has it (the copy keeps the flags); a parameter the user
    froze stays frozen. Inside a run the attack sees the user's flags, not the update's.

    Mini-batches of ``batch_size`` cycle over a fixed shuffle of ``relearn_set``; ``lr`` is fixed.
    The copy stays in eval mode (BatchNorm statistics and dropout frozen), so that only the
    parameters move and the attacks on different models compare like with like.
    """
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(
            f"relearn_attack needs steps >= 1, lr > 0 and batch_size >= 1; got {steps}, {lr}, {batch_size}."
        )
    attacked = copy.deepcopy(model)
    trainable = [p for p in attacked.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("relearn_attack needs a trainable parameter; every requires_grad of the model is False.")
    x, y = relearn_set
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    slices = [order[i : i + batch_size] for i in range(0, len(y), batch_size)]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    with torch.enable_grad(), eval_mode(attacked):
        for index in itertools.islice(itertools.cycle(slices), steps):
            (bx, by), *_ = batches_for(attacked, [(take(x, index), y[index])])
            optimizer.zero_grad()
            loss_fn(attacked(bx), by).backward()
            optimizer.step()
    return attacked.eval()


def relearn_evaluation(
    model: nn.Module,
    forget: Iterable[Any],
    test: Iterable[Any] | None,
    triggered: Iterable[Any] | None = None,
    *,
    num_classes: int,
    target_class: int | None = None,
    samples: int = 50,
    steps: int = 10,
    lr: float = 1e-4,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
) -> dict[str, Any]:
    """Attack a copy of ``model`` with the first ``samples`` of ``forget`` and measure the copy.

    Returns the attack's settings, ``heldout`` (:class:`ClassificationMetrics` on ``test``, plus
    ``attack_success_rate`` on ``triggered`` when given) and ``forget_accuracy_trained_labels``.
    It computes alone (no metric sync); inside a run, rank 0 computes it and broadcasts the result.
    """
    relearn_set = first_samples(forget, samples)
    attacked = relearn_attack(model, relearn_set, steps=steps, lr=lr, loss_fn=loss_fn, seed=seed)

    def measured(batches: Iterable[Any]) -> dict[str, float]:
        metric = ClassificationMetrics(num_classes, target_class, loss_fn=loss_fn, sync_on_compute=False)
        return metric.update_from(attacked, batches).compute()

    heldout = measured(test) if test is not None else {}
    if triggered is not None:
        heldout["attack_success_rate"] = measured(triggered)["predicted_as_target"]
    return {
        "samples": len(relearn_set[1]),
        "steps": steps,
        "lr": lr,
        "heldout": heldout,
        "forget_accuracy_trained_labels": measured(forget)["accuracy"],
    }


class RelearnAttack(Evaluation):
    """The relearning attack on a copy of the unlearned model, then its metrics (:func:`relearn_evaluation`).

    ``steps`` SGD steps of size ``lr`` on the first ``samples`` forget samples. Pick ``lr`` so that a
    model retrained without ``D_f`` is not taught it from scratch by the attack.
    """

    key = "relearn_attack"
    stages = ("after",)

    def __init__(self, samples: int = 50, steps: int = 10, lr: float = 1e-4) -> None:
        if samples < 1 or steps < 1 or not lr > 0:
            raise ValueError(f"RelearnAttack needs samples >= 1, steps >= 1 and lr > 0; got {samples}, {steps}, {lr}.")
        self.samples, self.steps, self.lr = samples, steps, lr

    def measure(self, run: RunContext) -> dict[str, Any]:
        data = run.data
        return run.processes.on_rank_zero(
            lambda: relearn_evaluation(
                run.model,
                run.whole(data.forget, "forget"),
                run.whole(data.test, "test"),
                run.whole(data.triggered_test, "triggered test"),
                num_classes=run.num_classes,
                target_class=run.target_class,
                samples=self.samples,
                steps=self.steps,
                lr=self.lr,
                loss_fn=run.loss_fn,
                seed=run.seed,
            )
        )

    def report_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return {"relearn": results["after"]}
