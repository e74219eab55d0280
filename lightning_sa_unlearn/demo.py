"""``make demo``: train PaperCNN on MNIST with 2,500 targeted poisoned labels, then unlearn them.

python -m lightning_sa_unlearn.demo --data ../shared/datasets
"""

from __future__ import annotations

import argparse
import os
import time

import lightning.pytorch as pl
import torch

from lightning_sa_unlearn import GGN, PoisonedLabelDataModule, SharpnessAwareUnlearning
from lightning_sa_unlearn.callback import quiet_trainer
from lightning_sa_unlearn.models import PaperCNN


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
    parser.add_argument("--curvature-samples", type=int, default=None, help="default: all training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo", help="where the JSON report and plot go")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
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
    unlearning = SharpnessAwareUnlearning(
        curvature=GGN(samples=args.curvature_samples),
        seed=args.seed,
        verbose=False,
        report_path=os.path.join(args.out, "report.json"),
        plot_path=os.path.join(args.out, "sharpness.png"),
    )
    unlearning.overwrite = True  # `make demo` again replaces its own report and plot in --out
    trainer = quiet_trainer(max_epochs=args.epochs, accelerator="cpu", callbacks=[unlearning], enable_progress_bar=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    total = time.perf_counter() - start
    report = unlearning.report
    training = total - report.seconds["total"]

    print(
        f"\nPaperCNN on MNIST, {len(datamodule.train_set):,} training images, "
        f"{args.num_poisoned:,} class-9 labels poisoned, {args.epochs} epochs (seed {args.seed})\n"
    )
    print(summary_table(report, target_class=9))
    print()
    print(report.format_table())
    print(
        f"\ntraining the poisoned model: {training:.1f} s; unlearning: {report.seconds['total']:.1f} s "
        f"({100 * report.seconds['total'] / training:.1f}% of training)"
    )
    print(f"report: {unlearning.report_path}\nplot:   {unlearning.plot_path}")


if __name__ == "__main__":
    main()
