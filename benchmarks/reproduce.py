"""Reproduce the paper's experiments against a model retrained from scratch (paper Tables 2-4, Figure 1).

    python benchmarks/reproduce.py --setting mnist_targeted --seeds 0 1 2 3 4
    python benchmarks/reproduce.py --from-json benchmarks/results/mnist_targeted.json   # the table again

For each seed it trains the poisoned model and the retrained model (same recipe, corrected
labels: the gold standard), then runs every method from the poisoned weights and writes
``<out>/<setting>.json`` (raw numbers) and ``<out>/<setting>.md`` (mean ± std over seeds), plus
``<out>/<setting>_layers.png`` (Figure 1: per-layer sharpness and per-layer gain). Trained models
and finished method results are cached under ``--cache``, so a rerun only redoes what changed and
an interrupted run resumes. τ is chosen on the validation split; the test split is only measured.
``--from-json`` trains nothing: it rebuilds the table and the plot from a results file alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    Setting,
    _digest,
    command_line,
    current_machine,
    default_parts,
    load_clause,
    lr_grid,
    machine_of,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    override,
    stat,
    sweep_layers,
    train,
    unlearn_or_refusal,
    unlearning_cost,
    write_results,
)
from sweep import RULES, plot_sweep, sweep_lines  # noqa: E402
from validated import validated_lines  # noqa: E402

from lightning_sa_unlearn import (  # noqa: E402
    CG,
    AllLayers,
    FineTune,
    FirstOrder,
    Flattest,
    IteratedFirstOrder,
    LastLayer,
    Layers,
    NewtonDecrement,
    SecondOrder,
    Sharpest,
    StepThenFineTune,
    ValidatedLayer,
    ValidatedStep,
)
from lightning_sa_unlearn.selection import select_layers, trainable_layers  # noqa: E402
from lightning_sa_unlearn.updates import DEFAULT_LRS  # noqa: E402


def _fine_tune(setting: Setting, **options: Any) -> FineTune:
    return FineTune(epochs=setting.fine_tune_epochs, lr=setting.fine_tune_lr, **options)


LR_GRID = list(DEFAULT_LRS)
"""The lr values a validated fine-tune tries: the default update's (around the MNIST settings' 0.01)."""

# Row name (the results files key on it) -> the callback's parts for a setting; the curvature part is the setting's.
METHODS: dict[str, Callable[[Setting], dict[str, Any]]] = {
    "fine-tune all layers on D_r": lambda s: dict(update=_fine_tune(s, include_corrected=False), selection=AllLayers()),
    # issue 24's reference: all layers, 1 epoch on D_r, the lr (of three) and epoch (0 or 1) chosen on validation
    "fine-tune all layers on D_r, lr on validation": lambda s: dict(
        update=FineTune(epochs=1, lr=lr_grid(s), include_corrected=False, best_epoch=True), selection=AllLayers()
    ),
    "first-order, last layer": lambda s: dict(selection=LastLayer()),
    "SA first-order, flattest": lambda s: dict(selection=Flattest()),
    # version 0.1 τ search (10-point grid, whole validation split) on the same models
    "SA first-order, flattest, v0.1 grid": lambda s: dict(
        selection=Flattest(), update=FirstOrder(ValidatedStep(search="grid"))
    ),
    "SA first-order, sharpest": lambda s: dict(selection=Sharpest()),
    # issue 14: the 2 flattest weight layers and the last each updated with its own τ search; validation picks
    "SA first-order, validated_layer": lambda s: dict(selection=ValidatedLayer()),
    "first-order, newton_decrement": lambda s: dict(selection=NewtonDecrement()),
    "SA second-order, flattest": lambda s: dict(update=SecondOrder(solver=CG(max_iterations=30)), selection=Flattest()),
    "fine-tune flattest layer on D_r ∪ D̃_f": lambda s: dict(update=_fine_tune(s), selection=Flattest()),
    # issue 24: the closed form repeated while validation says it helps (each τ chosen anew)
    "SA iterated first-order, flattest": lambda s: dict(update=IteratedFirstOrder(), selection=Flattest()),
    "iterated first-order, last layer": lambda s: dict(update=IteratedFirstOrder(), selection=LastLayer()),
    # issue 24: fine-tuning one layer on a retain subset, later epochs on stored features
    "fine-tune flattest layer, 10,000 retain samples": lambda s: dict(
        update=_fine_tune(s, retain_samples=10_000), selection=Flattest()
    ),
    "fine-tune last layer, 10,000 retain samples": lambda s: dict(
        update=_fine_tune(s, retain_samples=10_000), selection=LastLayer()
    ),
    "fine-tune flattest layer, 5,000 retain samples, 3 epochs": lambda s: dict(
        update=FineTune(epochs=3, lr=s.fine_tune_lr, retain_samples=5_000), selection=Flattest()
    ),
    "fine-tune flattest layer, 5,000 retain samples, best of 5 epochs": lambda s: dict(
        update=FineTune(epochs=5, lr=s.fine_tune_lr, retain_samples=5_000, best_epoch=True), selection=Flattest()
    ),
    # every choice on validation: the lr among three, then the epoch
    "fine-tune flattest layer, 5,000 retain samples, lr and best of 5 epochs on validation": lambda s: dict(
        update=FineTune(epochs=5, lr=LR_GRID, retain_samples=5_000, best_epoch=True), selection=Flattest()
    ),
    "fine-tune last layer, 5,000 retain samples, lr and best of 5 epochs on validation": lambda s: dict(
        update=FineTune(epochs=5, lr=LR_GRID, retain_samples=5_000, best_epoch=True), selection=LastLayer()
    ),
    # the candidate default: the closed form on the last layer, then that fine-tune from there
    # (the callback's defaults, curvature included: SharpnessAwareUnlearning() with only seed and quiet output)
    "step then fine-tune, last layer": lambda s: dict(curvature=None, **default_parts()),
    # the default update on the last 5 layers (ResNet-20: its last residual block and the classifier; at most all)
    "step then fine-tune, last 5 layers": lambda s: dict(
        curvature=None,
        selection=LastLayer(num_layers=min(5, len(trainable_layers(make_model(s))))),
        update=StepThenFineTune(),
    ),
}


class SweepLayer(Layers):
    """One named layer, with the whole forget gradient measured, so that the report has every layer's
    Newton decrement (the ``newton_decrement`` row of the rule table reads it from the sweep)."""

    needs_forget_gradient = True


def sweep_rule(parts: dict[str, Any]) -> str | None:
    """The rule whose pick the layer sweep already ran with the same update, or None.

    The sweep runs ``FirstOrder()`` (default τ search) with the setting's curvature on one layer at a time:
    that update on one layer picked by a fixed rule is the sweep's run of the rule's layer."""
    update, selection = parts.get("update", FirstOrder()), parts.get("selection")
    step = getattr(update, "step_size", None)
    if set(parts) - {"update", "selection"} or type(update) is not FirstOrder:
        return None
    default = ValidatedStep()
    if (
        type(step) is not ValidatedStep
        or step.grid is not None
        or (step.spec, step.search) != (default.spec, default.search)
    ):
        return None
    if not isinstance(selection, (Flattest, Sharpest, NewtonDecrement, LastLayer)) or selection.num_layers != 1:
        return None
    return selection.name if selection.name in RULES else None


def run_seed(
    name: str, setting: Setting, seed: int, cache: str, methods: list[str] | None = None, sweep: bool = True
) -> dict:
    """Everything for one seed, resumable: a finished method is read back from the cache."""
    folder = os.path.join(cache, name, f"seed{seed}")
    results_path = os.path.join(folder, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}

    def save() -> None:
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)

    datamodule = make_datamodule(setting, seed)
    poisoned, poisoned_seconds = train(setting, seed, "poisoned", os.path.join(folder, "poisoned.pt"))
    retrained, retrained_seconds = train(setting, seed, "corrected", os.path.join(folder, "retrained.pt"))
    results["poisoned"] = {**measure(poisoned, datamodule), "seconds": poisoned_seconds}
    results["retrained"] = {**measure(retrained, datamodule), "seconds": retrained_seconds}
    save()

    def unlearn(key: str, **parts: Any) -> dict:
        if key in results:
            return results[key]
        model = make_model(setting).to(setting.device or poisoned.device)
        model.load_state_dict(poisoned.state_dict())
        callback = make_callback(setting, seed, **parts)
        start = time.perf_counter()
        report, refusal = unlearn_or_refusal(callback, model, datamodule)
        seconds = time.perf_counter() - start
        report_fields = report.to_dict() if report is not None else None
        results[key] = {**measure(model, datamodule), "seconds": seconds, "report": report_fields, **refusal}
        if report is not None:
            results[key]["cost"] = unlearning_cost(setting, report, poisoned, datamodule, callback)
        save()
        print(
            f"  {key}: {results[key]['seconds']:.1f} s, held-out {results[key]['heldout']['accuracy']:.4f}", flush=True
        )
        return results[key]

    layers = sweep_layers(setting) if sweep else []
    scores = None  # a sweep run's report: the per-layer scores are measured alike in each (a refused run has none)
    for layer in layers:  # the Figure 1 sweep
        scores = unlearn(f"layer {layer}", selection=SweepLayer([layer]))["report"] or scores
    for method, parts_for in METHODS.items():
        if methods and method not in methods:
            continue
        parts = parts_for(setting)
        rule = sweep_rule(parts)
        if scores is not None and rule is not None:
            by_layer = scores["newton_decrement"] if rule == "newton_decrement" else scores["layer_sharpness"]
            picked = f"layer {select_layers(by_layer, rule)[0]}"
            if picked in results:  # the same run as the sweep's (a layer outside the sweep runs below)
                results[method] = results[picked]
                continue
        unlearn(method, **parts)
    save()
    return results


def record(setting: Setting, runs: dict[int, dict], command: str, load: list | None = None) -> dict[str, Any]:
    """What ``<setting>.json`` holds: the setting, the command, this machine (and its load average before
    and after the run, when given) and each seed's raw numbers."""
    return {
        "setting": dataclasses.asdict(setting),
        "command": command,
        "machine": current_machine(),
        **({"load_average": load} if load else {}),
        "runs": {str(s): _without_reports(runs[s]) for s in sorted(runs)},
    }


def summarize(name: str, results: dict[str, Any], out: str, machine: dict[str, Any] | None = None) -> str:
    """Write ``<out>/<name>.md``, ``.json`` (``results`` as given) and the plot; returns the markdown.

    The table depends on ``results`` and ``machine`` alone (default: ``results["machine"]``).
    """
    setting = results["setting"]
    machine = machine or results["machine"]
    runs = {int(seed): run for seed, run in results["runs"].items()}
    target = Setting(**setting).target_class
    seeds = sorted(runs)

    def column(row: str, pick) -> list[float]:  # seeds without this row (an interrupted run) are left out
        return [pick(runs[s][row], runs[s]) for s in seeds if row in runs[s]]

    def gap(row_metrics, run, key="accuracy"):
        poisoned, retrained = run["poisoned"]["heldout"][key], run["retrained"]["heldout"][key]
        return (row_metrics["heldout"][key] - poisoned) / (retrained - poisoned) if retrained != poisoned else math.nan

    rows = [row for row in ("poisoned", "retrained", *METHODS) if any(row in runs[s] for s in seeds)]
    damage = [runs[s]["retrained"]["heldout"]["accuracy"] - runs[s]["poisoned"]["heldout"]["accuracy"] for s in seeds]
    lines = [
        f"# {name}: unlearning against retraining from scratch",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Setting: {json.dumps(setting)}; seeds {seeds}; mean ± std over seeds. "
        f"Machine: {machine['cpu_cores']} CPU cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}." + load_clause(results.get("load_average")),
        "",
        f"**Damage** (retrained − poisoned held-out accuracy): {stat(damage)} points.",
    ]
    if target is not None:
        class_damage = [
            runs[s]["retrained"]["heldout"][f"accuracy_class_{target}"]
            - runs[s]["poisoned"]["heldout"][f"accuracy_class_{target}"]
            for s in seeds
        ]
        lines[-1] += f" On class {target}: {stat(class_damage)} points."
    fit = [runs[s]["poisoned"]["forget_trained_labels"] for s in seeds]
    lines += [f"The poisoned model fits {stat(fit)}% of the poisoned labels of D_f.", ""]
    header = ["method", "held-out acc %"]
    if target is not None:
        header += [f"class {target} acc %", "other classes acc %"]
    header += ["gap restored %"] + ([f"class {target} gap restored %"] if target is not None else [])
    header += ["D_f acc (true labels) %"]
    # columns that only newer results files have (a table rebuilt from an older file keeps its columns)
    extra = [
        (key, title, pick, digits)
        for key, title, pick, digits in (
            ("loss_threshold_auc", "MIA AUC (D_f vs test)", lambda value: value, 3),
            ("cost", "units % of training", lambda value: value["units_percent"], 2),
        )
        if any(key in r for run in runs.values() for r in run.values() if isinstance(r, dict))
    ]
    header += [title for _, title, _, _ in extra] + ["seconds", "seconds / retraining"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row, stat(column(row, lambda r, run: r["heldout"]["accuracy"]))]
        if target is not None:
            cells += [
                stat(column(row, lambda r, run: r["heldout"][f"accuracy_class_{target}"])),
                stat(column(row, lambda r, run: r["heldout"]["accuracy_other_classes"])),
            ]
        fixed = row in ("poisoned", "retrained")
        cells.append("" if fixed else stat(column(row, lambda r, run: gap(r, run)), 100.0, 0))
        if target is not None:
            key = f"accuracy_class_{target}"
            cells.append("" if fixed else stat(column(row, lambda r, run: gap(r, run, key)), 100.0, 0))
        cells.append(stat(column(row, lambda r, run: r["forget_true_labels"])))
        for key, _, pick, digits in extra:
            values = [pick(runs[s][row][key]) for s in seeds if key in runs[s].get(row, {})]
            cells.append(stat(values, 1.0, digits) if values else "")
        cells += [
            "" if row == "poisoned" else stat(column(row, lambda r, run: r["seconds"]), 1.0, 1),
            ""
            if row in ("poisoned", "retrained")
            else stat(column(row, lambda r, run: r["seconds"] / run["retrained"]["seconds"]), 100.0, 1) + "%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    refused = [f"{row} (seed {s})" for s in seeds for row, run in runs[s].items() if "refused" in run]
    if refused:
        lines += ["", f"Refused by the harm guard (the row is the poisoned model): {', '.join(refused)}."]
    lines += sweep_lines(runs, seeds) + validated_lines(runs, seeds)
    text = "\n".join(lines) + "\n"
    write_results(out, name, text, results)
    plot_sweep(runs, seeds, os.path.join(out, f"{name}_layers.png"), name)
    return text


def _without_reports(run: dict) -> dict:
    """The raw numbers, with each report cut to what the tables use."""
    keep = ("layer_sharpness", "selected_layers", "tau", "newton_decrement", "solver", "seconds", "selection_trials")
    return {k: {**v, "report": {r: v["report"].get(r) for r in keep}} if v.get("report") else v for k, v in run.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache", default="cache/benchmarks")
    parser.add_argument("--root", default=None, help="override the setting's data folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (names as in the table)")
    parser.add_argument("--skip-sweep", action="store_true", help="run the methods without the layer sweep")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="override setting fields")
    parser.add_argument("--summarize-only", action="store_true", help="summarize the cached results only")
    parser.add_argument("--from-json", metavar="PATH", help="rebuild the table and plot of a results file")
    args = parser.parse_args(argv)
    load = [list(os.getloadavg())]
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        name = os.path.splitext(os.path.basename(args.from_json))[0]
        print(summarize(name, results, args.out, machine_of(args.from_json, results)))
        return
    if args.setting is None:
        parser.error("--setting is required (or --from-json)")
    torch.set_num_threads(args.threads)
    setting = override(SETTINGS[args.setting], args.set)
    # an overridden setting gets a cache of its own: its models are not the setting's models
    cache_name = args.setting if setting == SETTINGS[args.setting] else f"{args.setting}-{_digest(setting)}"
    if args.root:  # where the data lives does not change the experiment
        setting = dataclasses.replace(setting, root=args.root)
    runs = {}
    for seed in args.seeds:
        print(f"[{args.setting}] seed {seed}", flush=True)
        if args.summarize_only:
            with open(os.path.join(args.cache, cache_name, f"seed{seed}", "results.json")) as f:
                runs[seed] = json.load(f)
        else:
            runs[seed] = run_seed(cache_name, setting, seed, args.cache, args.methods, not args.skip_sweep)
    # the command that regenerates the table (from the cache, or from scratch without one)
    words = [word for word in (argv if argv is not None else sys.argv[1:]) if word != "--summarize-only"]
    command = command_line("reproduce.py", words)
    print(summarize(args.setting, record(setting, runs, command, [*load, list(os.getloadavg())]), args.out))


if __name__ == "__main__":
    main()
