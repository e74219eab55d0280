"""Held-out and forget-set metrics before and after unlearning (always measured)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_sa_unlearn.data import sized
from lightning_sa_unlearn.evaluations.base import Evaluation
from lightning_sa_unlearn.evaluations.metrics import ClassificationMetrics

if TYPE_CHECKING:
    from lightning_sa_unlearn.run_context import RunContext


class HeldOutMetrics(Evaluation):
    """Accuracy, loss and per-class accuracy on ``test_dataloader()``, accuracy on ``D_f`` and ``D̃_f``.

    With a ``triggered_test_dataloader()`` the held-out metrics add the backdoor's attack success
    rate (the share of triggered non-target samples predicted as ``target_class``). Metrics are
    torchmetrics states summed across processes.
    """

    key = "evaluation"

    def check(self, run: RunContext) -> None:
        if run.data.triggered_test is not None and run.target_class is None:
            raise ValueError(
                "triggered_test_dataloader() is defined but the datamodule has no target_class; set "
                "datamodule.target_class to the backdoor's target so that the attack success rate can be measured."
            )
        if run.data.test is None:
            rank_zero_warn("no test_dataloader(): the report will have no held-out metrics.")

    def measure(self, run: RunContext) -> dict[str, Any]:
        def metric(target_class: int | None = None) -> ClassificationMetrics:
            return ClassificationMetrics(run.num_classes, target_class, loss_fn=run.loss_fn)

        metrics = {"forget": (metric(), run.forget)}
        if run.corrected is not None:
            metrics["corrected"] = (metric(), run.corrected)
        if run.test is not None:
            metrics["test"] = (metric(run.target_class), run.test)
        if run.triggered is not None:
            metrics["triggered"] = (metric(run.target_class), run.triggered)

        def update() -> None:
            for name, (state, loader) in metrics.items():
                description = "held-out metrics" if name == "test" else f"{name} metrics"
                state.update_from(run.model, loader, lambda it: run.progress(it, description, sized(loader)))

        run.processes.agree(update)
        values = {name: state.compute() for name, (state, _) in metrics.items()}  # syncs across processes
        heldout = values.get("test", {})
        if "triggered" in values:
            heldout["attack_success_rate"] = values["triggered"]["predicted_as_target"]
        forget = {"accuracy_trained_labels": values["forget"]["accuracy"]}
        if "corrected" in values:
            forget["accuracy_corrected_labels"] = values["corrected"]["accuracy"]
        return {"heldout": heldout, "forget": forget}

    def report_fields(self, results: dict[str, Any]) -> dict[str, Any]:
        return {
            f"{group}_{stage}": result[group] for stage, result in results.items() for group in ("heldout", "forget")
        }
