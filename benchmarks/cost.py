"""What unlearning costs against training, per stage, in seconds and in gradient-pass units (issue #13).

    python benchmarks/cost.py --setting mnist_targeted --runs 3   # writes benchmarks/results/cost_<setting>.{md,json}

In one process: train the poisoned model (seconds measured here), time one plain gradient pass per
sample, then unlearn copies of the fitted model ``--runs`` times per method and take the median of
each stage. Units: a forward+backward over one sample is 1, a forward alone 1/3; training for E
epochs on N samples is E·N. Passes are the report's ``sample_passes`` (counted by the run); curvature
samples and passes through the layers above stored outputs are priced by
:func:`lightning_sa_unlearn.passes.unlearning_units`, timed against a gradient pass in this process.
"The unlearning itself" is the forget gradient, curvature, selection and update; evaluations are
reporting and are timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    command_line,
    default_parts,
    lr_grid,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    override,
    quiet_lightning,
    train,
    unlearning_cost,
    write_results,
)

from lightning_sa_unlearn import GGN, AllLayers, FineTune, FirstOrder, Flattest, LastLayer  # noqa: E402
from lightning_sa_unlearn.passes import seconds_per_gradient_sample  # noqa: E402
from lightning_sa_unlearn.pipeline import UNLEARNING_STAGES  # noqa: E402
from lightning_sa_unlearn.updates import DEFAULT_LRS  # noqa: E402

# curvature=None: the callback's default estimator (MonteCarloGGN read until the selection is confident).
METHODS = {
    "defaults: step then fine-tune, last layer": lambda s: dict(curvature=None, **default_parts()),
    "SA first order, flattest (defaults)": lambda s: dict(curvature=None, selection=Flattest(), update=FirstOrder()),
    "SA first order, flattest, GGN instead": lambda s: dict(curvature=GGN(), selection=Flattest(), update=FirstOrder()),
    "first order, last layer": lambda s: dict(curvature=None, selection=LastLayer(), update=FirstOrder()),
    "fine-tune all layers on D_r, 1 epoch, lr of 3 on validation": lambda s: dict(
        curvature=None,
        selection=AllLayers(),
        update=FineTune(epochs=1, lr=lr_grid(s), include_corrected=False, best_epoch=True),
    ),
    "fine-tune flattest layer (1 epoch)": lambda s: dict(
        curvature=None, selection=Flattest(), update=FineTune(epochs=s.fine_tune_epochs, lr=s.fine_tune_lr)
    ),
    "fine-tune flattest layer, 10,000 retain samples (1 epoch)": lambda s: dict(
        curvature=None, selection=Flattest(), update=FineTune(epochs=1, lr=s.fine_tune_lr, retain_samples=10_000)
    ),
    "fine-tune flattest layer, 5,000 retain samples, 3 epochs (cached features)": lambda s: dict(
        curvature=None, selection=Flattest(), update=FineTune(epochs=3, lr=s.fine_tune_lr, retain_samples=5_000)
    ),
    "fine-tune flattest layer, 5,000 retain samples, best of 5 epochs on validation": lambda s: dict(
        curvature=None,
        selection=Flattest(),
        update=FineTune(epochs=5, lr=s.fine_tune_lr, retain_samples=5_000, best_epoch=True),
    ),
    "fine-tune flattest layer, 5,000 retain samples, lr of 3 and best of 5 epochs on validation": lambda s: dict(
        curvature=None,
        selection=Flattest(),
        update=FineTune(epochs=5, lr=list(DEFAULT_LRS), retain_samples=5_000, best_epoch=True),
    ),
    "fine-tune last layer, 5,000 retain samples, lr of 3 and best of 5 epochs on validation": lambda s: dict(
        curvature=None,
        selection=LastLayer(),
        update=FineTune(epochs=5, lr=list(DEFAULT_LRS), retain_samples=5_000, best_epoch=True),
    ),
}


def measure_method(setting, seed: int, fitted: torch.nn.Module, datamodule, parts: dict, runs: int):
    reports = []
    for _ in range(runs):
        model = make_model(setting)
        model.load_state_dict(fitted.state_dict())
        callback = make_callback(setting, seed, **parts)
        reports.append(callback.unlearn(model, datamodule))
    seconds = {k: statistics.median(r.seconds.get(k, 0.0) for r in reports) for k in reports[0].seconds}
    # counted passes are the same in every run; curvature and the layers above stored outputs are timed here
    cost = unlearning_cost(setting, reports[0], fitted, datamodule, callback)
    return {
        "seconds": seconds,
        "units": cost["units"],
        "unlearning_units": cost["unlearning_units"],
        "sample_passes": reports[0].sample_passes,
        "report": {
            k: reports[0].to_dict()[k]
            for k in (
                "selected_layers",
                "tau",
                "curvature_samples",
                "curvature_stop",
                "validation_samples",
                "update_steps",
                "update_details",
                "harm_guard",
            )
        },
        "heldout_after": reports[0].heldout_after.get("accuracy"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="mnist_targeted", choices=sorted(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these rows (names as in the table)")
    parser.add_argument(
        "--cache",
        default=None,
        help="take the fitted models of a reproduce.py cache (<cache>/<setting>/seed<seed>/) instead of training "
        "them here; their training seconds are then those recorded by that run, under its load",
    )
    args = parser.parse_args(argv)
    setting = override(SETTINGS[args.setting], args.set)
    with tempfile.TemporaryDirectory() as folder, quiet_lightning():
        if args.cache:
            folder = os.path.join(args.cache, args.setting, f"seed{args.seed}")
        fitted, training_seconds = train(setting, args.seed, "poisoned", os.path.join(folder, "poisoned.pt"))
        retrained, _ = train(setting, args.seed, "corrected", os.path.join(folder, "retrained.pt"))
    datamodule = make_datamodule(setting, args.seed)
    poisoned_accuracy = measure(fitted, datamodule)["heldout"]["accuracy"]
    retrained_accuracy = measure(retrained, datamodule)["heldout"]["accuracy"]
    unit_seconds = seconds_per_gradient_sample(fitted, datamodule.train_dataloader())
    training_units = setting.epochs * len(datamodule.train_set)
    rows = {}
    for name, parts in METHODS.items():
        if args.methods and name not in args.methods:
            continue
        with quiet_lightning():
            rows[name] = measure_method(setting, args.seed, fitted, datamodule, parts(setting), args.runs)
        print(name, json.dumps(rows[name]["seconds"]), flush=True)
    load = os.getloadavg()
    header = [
        f"# Cost of unlearning against training: {args.setting}",
        "",
        f"Command: `{command_line('cost.py', argv)}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"load average after the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).",
        "",
        f"Training the poisoned model{' (recorded in the cache)' if args.cache else ' here'}: "
        f"{training_seconds:.1f} s, {training_units:,} units "
        f"({setting.epochs} epochs × {len(datamodule.train_set):,} samples). One gradient pass: "
        f"{1e3 * unit_seconds:.3f} ms per sample. Seconds are medians of {args.runs} runs on copies of the model.",
        f"Held-out accuracy: poisoned {100 * poisoned_accuracy:.2f}%, retrained from scratch on corrected labels "
        f"{100 * retrained_accuracy:.2f}%; gap restored = (after − poisoned) / (retrained − poisoned).",
        "",
        "| method | unlearning s | % of training (s) | unlearning units | % of training (units) | "
        "forget gradient s | curvature s (samples, stop) | selection s | update s | reporting s | held-out acc after | "
        "gap restored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s, units, report = row["seconds"], row["unlearning_units"], row["report"]
        header.append(
            f"| {name} | {s['unlearning']:.2f} | {100 * s['unlearning'] / training_seconds:.2f}% | {units:,.0f} | "
            f"{100 * units / training_units:.2f}% | {s.get('forget_gradient', 0):.2f} | {s.get('curvature', 0):.2f} "
            f"({report['curvature_samples']}, {report['curvature_stop']}) | {s.get('selection', 0):.3f} | "
            f"{s.get('update', 0):.2f} | {s['reporting']:.2f} | {100 * row['heldout_after']:.2f}% | "
            f"{100 * (row['heldout_after'] - poisoned_accuracy) / (retrained_accuracy - poisoned_accuracy):.0f}% |"
        )
    header += [
        "",
        "Units per stage (counted passes; curvature samples and passes above stored outputs priced by timing):",
        "",
        "| method | " + " | ".join(UNLEARNING_STAGES) + " |",
        "|---|" + "---|" * len(UNLEARNING_STAGES),
    ]
    for name, row in rows.items():
        header.append(f"| {name} | " + " | ".join(f"{row['units'].get(k, 0):,.0f}" for k in UNLEARNING_STAGES) + " |")
    header += [
        "",
        f"Stages that are not unlearning ({', '.join(k for k in ('evaluation', 'curvature_report'))}, evaluations) are "
        f"'reporting'. The unlearning stages are {', '.join(UNLEARNING_STAGES)}.",
    ]
    text = "\n".join(header) + "\n"
    results = {
        "setting": args.setting,
        "training_seconds": training_seconds,
        "training_units": training_units,
        "poisoned_accuracy": poisoned_accuracy,
        "retrained_accuracy": retrained_accuracy,
        "unit_seconds": unit_seconds,
        "rows": rows,
    }
    write_results(args.out, f"cost_{args.setting}", text, results)
    print(text)


if __name__ == "__main__":
    main()
