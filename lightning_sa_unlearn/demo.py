"""``make demo``: train PaperCNN on MNIST with 2,500 targeted poisoned labels, then unlearn them.

python -m lightning_sa_unlearn.demo --data ../shared/datasets
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_sa_unlearn import GGN, PoisonedLabelDataModule, SharpnessAwareUnlearning
from lightning_sa_unlearn.curvature import default_curvature
from lightning_sa_unlearn.models import PaperCNN
from lightning_sa_unlearn.passes import unlearning_units
from lightning_sa_unlearn.trainers import quiet_trainer


def summary_table(report, target_class: int) -> str:
    """The demo's headline: poisoned model versus the model after unlearning."""
    rows = [
        ("held-out accuracy", "accuracy"),
        (f"class-{target_class} accuracy", f"accuracy_class_{target_class}"),
        ("other classes' accuracy", "accuracy_other_classes"),
    ]
    lines = [
        f"| {'model':<28} | " + " | ".join(f"{label:<24}" for label, _ in rows) + " |",
        "|" + "-" * 30 + "|" + "|".join("-" * 26 for _ in rows) + "|",
    ]
    for name, metrics in (("poisoned", report.heldout_before), ("after unlearning", report.heldout_after)):
        lines.append(f"| {name:<28} | " + " | ".join(f"{100 * metrics[key]:>23.2f}%" for _, key in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/", help="folder with MNIST in torchvision's layout")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-poisoned", type=int, default=2500)
    parser.add_argument("--num-train", type=int, default=None, help="fewer training images (default: 50,000)")
    parser.add_argument(
        "--curvature-samples",
        type=int,
        default=None,
        help="a fixed count (default: read until the choice is confident)",
    )
    parser.add_argument("--runs", type=int, default=3, help="unlearning runs on copies of the fitted model (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo", help="where the JSON report and plot go")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: this small CNN gains little from more, and on a busy machine threads beyond "
        "the free cores slowed its training tenfold)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    download = not os.path.exists(os.path.join(args.data, "MNIST", "raw", "train-images-idx3-ubyte"))
    datamodule = PoisonedLabelDataModule(
        dataset="mnist",
        root=args.data,
        download=download,
        poison="targeted",
        target_class=9,
        num_poisoned=args.num_poisoned,
        num_train=args.num_train,
        seed=args.seed,
    )
    model = PaperCNN(lr=1e-3)
    curvature = GGN(samples=args.curvature_samples) if args.curvature_samples else None
    trainer = quiet_trainer(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    training = time.perf_counter() - start
    fitted = {k: v.clone() for k, v in model.state_dict().items()}
    reports = []
    for run in range(args.runs):  # the same unlearning on copies of the fitted model: a median, not one timing
        copy = PaperCNN(lr=1e-3)
        copy.load_state_dict(fitted)
        last = run == args.runs - 1
        unlearning = SharpnessAwareUnlearning(
            curvature=curvature,
            seed=args.seed,
            verbose=False,
            progress_bar=False,
            report_path=os.path.join(args.out, "report.json") if last else None,
            plot_path=os.path.join(args.out, "sharpness.png") if last else None,
        )
        reports.append(unlearning.unlearn(copy, datamodule, overwrite=True))  # `make demo` again replaces its own files
    report = reports[-1]
    seconds = statistics.median(r.seconds["unlearning"] for r in reports)
    reporting = statistics.median(r.seconds["reporting"] for r in reports)
    training_units = args.epochs * len(datamodule.train_set)
    units = unlearning_units(
        report, model, datamodule.train_dataloader(), curvature or default_curvature(F.cross_entropy)
    )

    print(
        f"\nPaperCNN on MNIST, {len(datamodule.train_set):,} training images, "
        f"{args.num_poisoned:,} class-9 labels poisoned, {args.epochs} epochs (seed {args.seed})\n"
    )
    print(summary_table(report, target_class=9))
    print()
    print(report.format_table())
    print(f"\ntraining the poisoned model: {training:.1f} s ({training_units:,} units)")
    print(
        f"unlearning: {seconds:.2f} s ({100 * seconds / training:.2f}% of training), median of {args.runs} runs; "
        f"{sum(units.values()):,.0f} units ({100 * sum(units.values()) / training_units:.2f}% of training)"
    )
    print("  units per stage: " + ", ".join(f"{stage} {n:,.0f}" for stage, n in units.items()))
    print(f"reporting (held-out metrics before and after): {reporting:.2f} s")
    print(
        "units: one forward+backward pass over one sample (a forward alone: 1/3), counted per stage; curvature and "
        "passes through the layers above stored outputs priced against a timed gradient pass"
    )
    print(f"report: {os.path.join(args.out, 'report.json')}\nplot:   {os.path.join(args.out, 'sharpness.png')}")


if __name__ == "__main__":
    main()
