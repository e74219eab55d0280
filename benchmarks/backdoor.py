"""Backdoor removal on mnist_backdoor (issue 14, item 4): which update and rule get closest to retraining?

    python benchmarks/backdoor.py --seeds 0 1 2     # writes <out>/backdoor.{md,json}
    python benchmarks/backdoor.py --from-json benchmarks/results/v0_2/backdoor.json   # the table again

500 training images not of class 9 carry a 3×3 trigger and the label 9; ``D̃_f`` is the same images
without the trigger, with their true labels. Target: attack success rate (ASR: triggered test images
not of class 9 predicted 9) at most 5% with clean test accuracy within 1 point of the retrained model.
Every step size is chosen on validation data plus the forget inputs with their corrected labels
(``objective="validation_and_forget"``), never the test set; fine-tune has a fixed lr and no search.
Trained models come from the cache shared with ``reproduce.py`` and ``robustness.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    Setting,
    load_clause,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    rebuilt_from_json,
    recorded_run,
    stat,
    train,
    unlearn_or_refusal,
    unlearning_cost,
    write_results,
)

from lightning_sa_unlearn import (  # noqa: E402
    AllLayers,
    FineTune,
    FirstOrder,
    Flattest,
    LastLayer,
    StepThenFineTune,
    ValidatedLayer,
    ValidatedStep,
)
from lightning_sa_unlearn.updates import DEFAULT_LRS  # noqa: E402

SCENARIO = "mnist_backdoor"


def _steered() -> FirstOrder:
    return FirstOrder(ValidatedStep(objective="validation_and_forget"))


def _fine_tune(setting: Setting, epochs: int | None = None) -> FineTune:
    return FineTune(epochs=epochs or setting.fine_tune_epochs, lr=setting.fine_tune_lr)


METHODS: dict[str, Callable[[Setting], dict[str, Any]]] = {
    "first-order, flattest": lambda s: dict(update=_steered(), selection=Flattest()),
    "first-order, last layer": lambda s: dict(update=_steered(), selection=LastLayer()),
    "first-order, validated_layer": lambda s: dict(update=_steered(), selection=ValidatedLayer()),
    "first-order, validated_layer k=3 (every weight layer)": lambda s: dict(
        update=_steered(), selection=ValidatedLayer(k=3)
    ),
    "fine-tune flattest layer on D_r ∪ D̃_f": lambda s: dict(update=_fine_tune(s), selection=Flattest()),
    "fine-tune last layer on D_r ∪ D̃_f": lambda s: dict(update=_fine_tune(s), selection=LastLayer()),
    "fine-tune, validated_layer": lambda s: dict(update=_fine_tune(s), selection=ValidatedLayer()),
    # D̃_f by label correction: the forget inputs as trained (trigger on) with their true labels, the data that
    # the validation_and_forget objective already reads; the datamodule's own D̃_f removes the trigger instead
    "first-order, validated_layer, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_steered(), selection=ValidatedLayer(), correction="labels"
    ),
    "fine-tune flattest layer, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s), selection=Flattest(), correction="labels"
    ),
    "fine-tune, validated_layer, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s), selection=ValidatedLayer(), correction="labels"
    ),
    "fine-tune last layer, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s), selection=LastLayer(), correction="labels"
    ),
    "fine-tune, validated_layer k=3, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s), selection=ValidatedLayer(k=3), correction="labels"
    ),
    "fine-tune flattest layer 3 epochs, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s, epochs=3), selection=Flattest(), correction="labels"
    ),
    "fine-tune flattest layer 10 epochs, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s, epochs=10), selection=Flattest(), correction="labels"
    ),
    # issue 24: a retain subset, the epoch chosen on validation plus the triggered inputs under their true labels
    "fine-tune flattest layer, 5,000 retain samples, best of 10 epochs, D̃_f = triggered inputs, true labels": (
        lambda s: dict(
            update=FineTune(
                epochs=10,
                lr=s.fine_tune_lr,
                retain_samples=5_000,
                best_epoch=True,
                objective="validation_and_forget",
            ),
            selection=Flattest(),
            correction="labels",
        )
    ),
    # the default update (closed form, then the validated fine-tune) with both stages read by validation_and_forget
    "step then fine-tune, last layer, best of 10 epochs, D̃_f = triggered inputs, true labels": lambda s: dict(
        update=StepThenFineTune(
            _steered(),
            FineTune(
                epochs=10,
                lr=list(DEFAULT_LRS),
                retain_samples=5_000,
                best_epoch=True,
                objective="validation_and_forget",
            ),
        ),
        selection=LastLayer(),
        curvature=None,  # the callback's default estimator (its report-only pass)
        correction="labels",
    ),
    "fine-tune all layers (reference), D̃_f = triggered inputs, true labels": lambda s: dict(
        update=_fine_tune(s), selection=AllLayers(), correction="labels"
    ),
}


@torch.no_grad()
def objective(model, datamodule) -> float:
    """What ``objective="validation_and_forget"`` reads, on all of it: the mean loss on the validation split plus
    the mean loss of the forget inputs (trigger on) under their true labels. No test data: a user can compute it."""
    model.eval()

    def mean_loss(x, y):
        return sum(
            F.cross_entropy(model(x[i : i + 1000]), y[i : i + 1000], reduction="sum") for i in range(0, len(y), 1000)
        )

    x_val, y_val = datamodule.val_set.tensors
    x_f, y_true = datamodule.forget_set.tensors[0], datamodule.corrected_set.tensors[1]
    return float(mean_loss(x_val, y_val) / len(y_val) + mean_loss(x_f, y_true) / len(y_true))


def _row(model, datamodule, report=None, seconds=None) -> dict[str, Any]:
    measured = measure(model, datamodule)
    row = {"accuracy": measured["heldout"]["accuracy"], "asr": measured["heldout"]["attack_success_rate"]}
    row["objective"] = objective(model, datamodule)
    if report is not None:
        trials = report.selection_trials or []
        row.update(
            selected_layers=report.selected_layers,
            tau=report.tau,
            seconds=seconds,
            unlearning_seconds=report.seconds.get("unlearning"),
            trials=[{k: t[k] for k in ("layers", "validation_objective", "tau", "chosen")} for t in trials],
        )
    return row


def run(seed: int, cache: str, methods: list[str]) -> dict[str, Any]:
    setting = SETTINGS[SCENARIO]
    folder = os.path.join(cache, SCENARIO, f"seed{seed}")
    path = os.path.join(folder, "backdoor.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    datamodule = make_datamodule(setting, seed)
    poisoned, _ = train(setting, seed, "poisoned", os.path.join(folder, "poisoned.pt"))
    retrained, _ = train(setting, seed, "corrected", os.path.join(folder, "retrained.pt"))
    results.setdefault("poisoned", _row(poisoned, datamodule))
    results.setdefault("retrained", _row(retrained, datamodule))
    for method in methods:
        if method in results:
            continue
        model = make_model(setting)
        model.load_state_dict(poisoned.state_dict())
        parts = METHODS[method](setting)
        data = datamodule
        if parts.pop("correction", None) == "labels":  # D̃_f = the triggered inputs with their true labels
            data = make_datamodule(setting, seed, corrected_inputs="triggered")
        start = time.perf_counter()
        callback = make_callback(setting, seed, **parts)
        report, refusal = unlearn_or_refusal(callback, model, data)
        results[method] = _row(model, datamodule, report, time.perf_counter() - start)
        if report is not None:
            results[method]["cost"] = unlearning_cost(setting, report, poisoned, data, callback)
        if report is None:  # the weights were restored: the row is the poisoned model's
            results[method].update(seconds=time.perf_counter() - start, selected_layers=[], tau=None, **refusal)
        r = results[method]
        print(
            f"  seed {seed} {method}: acc {r['accuracy']:.4f}, ASR {r['asr']:.4f}, {r['selected_layers']}",
            f"refused: {r['refused'][:80]}" if "refused" in r else "",
            flush=True,
        )
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    return results


def summarize(results: dict[str, Any], out: str) -> str:
    runs = {int(s): r for s, r in results["runs"].items()}
    seeds = sorted(runs)
    rows = [row for row in ("poisoned", "retrained", *METHODS) if all(row in runs[s] for s in seeds)]
    lines = [
        "# mnist_backdoor: backdoor removal against retraining (issue 14, item 4)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Seeds {seeds}; mean ± std over seeds. {results['torch_threads']} torch threads."
        + load_clause(results.get("load_average")),
        "Target: ASR ≤ 5% and clean accuracy within 1 point of the retrained model (seed by seed).",
        "",
        "Objective: validation loss + loss of the forget inputs (trigger on) under their true labels, after "
        "unlearning (what `validation_and_forget` steers τ by; no test data).",
        "",
        "| method | clean test acc % | ASR % | acc − retrained (points) | seeds meeting the target | objective "
        "| seconds "
        "| layers picked | τ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        values = [runs[s][row] for s in seeds]
        behind = [v["accuracy"] - runs[s]["retrained"]["accuracy"] for v, s in zip(values, seeds)]
        met = sum(v["asr"] <= 0.05 and b >= -0.01 for v, b in zip(values, behind))
        picked = "; ".join(sorted({", ".join(v.get("selected_layers", [])) for v in values} - {""}))
        refused = sum("refused" in v for v in values)
        picked += f" (harm guard refused {refused} of {len(seeds)}: poisoned weights kept)" if refused else ""
        taus = [v.get("tau") for v in values]
        fixed = row in ("poisoned", "retrained")
        lines.append(
            f"| {row} | {stat([v['accuracy'] for v in values])} | {stat([v['asr'] for v in values])} | "
            f"{'' if row == 'retrained' else stat(behind)} | {'' if fixed else f'{met} of {len(seeds)}'} | "
            f"{stat([v['objective'] for v in values], 1.0, 4)} | "
            f"{'' if fixed else stat([v['seconds'] for v in values], 1.0, 1)} | {picked} | "
            f"{', '.join('-' if t is None else f'{t:.3g}' for t in taus) if not fixed else ''} |"
        )
    methods = [row for row in rows if row not in ("poisoned", "retrained")]
    picks = {s: min(methods, key=lambda row: runs[s][row]["objective"]) for s in seeds}
    lines += ["", "The method of least objective on each seed (a choice a user can make without the test set):", ""]
    for s, row in picks.items():
        r = runs[s][row]
        lines.append(f"- seed {s}: {row}: clean {100 * r['accuracy']:.2f}%, ASR {100 * r['asr']:.2f}%")
    text = "\n".join(lines) + "\n"
    write_results(out, "backdoor", text, results)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/results/v0_2")
    parser.add_argument("--cache", default="cache/benchmarks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--from-json", metavar="PATH", help="run nothing: rebuild the table of a backdoor.json")
    args = parser.parse_args(argv)
    if rebuilt_from_json(args.from_json, lambda results: summarize(results, args.out)):
        return
    results = recorded_run(
        "backdoor.py",
        argv,
        args.threads,
        lambda: {str(seed): run(seed, args.cache, args.methods) for seed in args.seeds},
    )
    print(summarize(results, args.out))


if __name__ == "__main__":
    main()
