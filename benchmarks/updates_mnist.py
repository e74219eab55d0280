"""Each update and rule once on the fitted MNIST model of examples/mnist_targeted.yaml (one seed).

    python benchmarks/ddp_curvature.py     # or `sa-unlearn fit --config examples/mnist_targeted.yaml`
    python benchmarks/updates_mnist.py     # writes benchmarks/results/updates_mnist.{md,json}

A smoke-level comparison for choosing defaults; the seeded comparison against retraining is
benchmarks/reproduce.py. Every run starts from the same fitted checkpoint; τ, when "auto", is
chosen on the validation split.
"""

from __future__ import annotations

import json
import pathlib

import torch

from lightning_sa_unlearn import (
    CG,
    GGN,
    FineTune,
    FirstOrder,
    Flattest,
    ForgetLossDescent,
    LastLayer,
    NewtonDecrement,
    PoisonedLabelDataModule,
    SecondOrder,
    Sharpest,
    SharpnessAwareUnlearning,
    TopFraction,
)
from lightning_sa_unlearn.models import PaperCNN

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "outputs" / "mnist_targeted" / "fitted.ckpt"
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = 10_000  # curvature (and Hessian-vector product) samples

RUNS = {
    "first_order, flattest": dict(),
    "first_order, sharpest": dict(selection=Sharpest()),
    "first_order, last": dict(selection=LastLayer()),
    "first_order, newton_decrement": dict(selection=NewtonDecrement()),
    "first_order, flattest 10% of entries": dict(selection=TopFraction(Flattest(), fraction=0.1)),
    "second_order (CG), flattest": dict(
        curvature=GGN(SAMPLES, damping=1.0), update=SecondOrder(solver=CG(max_iterations=50))
    ),
    "second_order (CG), last": dict(
        curvature=GGN(SAMPLES, damping=1.0), selection=LastLayer(), update=SecondOrder(solver=CG(max_iterations=50))
    ),
    "forget_loss, flattest": dict(update=ForgetLossDescent(steps=20, lr=0.05, retain_weight=1.0)),
    "fine_tune, flattest": dict(update=FineTune(epochs=1, lr=0.01)),
}


def main() -> None:
    datamodule = PoisonedLabelDataModule(
        dataset="mnist",
        root=str(ROOT.parent / "shared" / "datasets"),
        poison="targeted",
        target_class=9,
        num_poisoned=2500,
        seed=0,
    )
    rows = {}
    for name, parts in RUNS.items():
        model = PaperCNN.load_from_checkpoint(CHECKPOINT, weights_only=True)
        # GGN on SAMPLES samples, damping 1e-3, the flattest layer and the first order unless the run says
        parts = {"curvature": GGN(SAMPLES), "selection": Flattest(), "update": FirstOrder(), **parts}
        callback = SharpnessAwareUnlearning(verbose=False, progress_bar=False, **parts)
        report = callback.unlearn(model, datamodule)
        rows[name] = report.to_dict()
        print(
            f"{name:<40} acc {100 * report.heldout_after['accuracy']:.2f}%  "
            f"class 9 {100 * report.heldout_after['accuracy_class_9']:.2f}%  {report.seconds['total']:.1f} s",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "updates_mnist.json").write_text(json.dumps(rows, indent=2, default=str))
    before = next(iter(rows.values()))["heldout_before"]
    lines = [
        "# Updates and rules on the fitted MNIST model (one seed)",
        "",
        f"Command: `python benchmarks/updates_mnist.py` (checkpoint of `examples/mnist_targeted.yaml`, seed 0; "
        f"GGN curvature and Hessian-vector products on {SAMPLES:,} training samples; "
        f"{torch.get_num_threads()} threads).",
        "",
        "| run | layers | parameters updated | held-out acc | class 9 | other classes | seconds | note |",
        "|---|---|---|---|---|---|---|---|",
        f"| poisoned model | | | {100 * before['accuracy']:.2f}% | {100 * before['accuracy_class_9']:.2f}% | "
        f"{100 * before['accuracy_other_classes']:.2f}% | | |",
    ]
    for name, r in rows.items():
        a = r["heldout_after"]
        note = ""
        if r["solver"]:
            note = f"{r['solver']['iterations']} iterations, residual {r['solver']['relative_residual']:.2g}; "
        if r["tau"] is not None:
            note += f"tau {r['tau']:.3g}"
        if r["update"] == "forget_loss":
            note += f"best step {r['update_steps']} of 20 (validation)"
        lines.append(
            f"| {name} | {', '.join(r['selected_layers'])} | {r['num_updated_parameters']:,} | "
            f"{100 * a['accuracy']:.2f}% | {100 * a['accuracy_class_9']:.2f}% | "
            f"{100 * a['accuracy_other_classes']:.2f}% | "
            f"{r['seconds']['total']:.1f} | {note} |"
        )
    (RESULTS / "updates_mnist.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
