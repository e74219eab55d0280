"""Relearning attacks, membership inference and backdoors: which selection rule unlearns robustly?

    python benchmarks/robustness.py --seeds 0 1 2      # writes benchmarks/results/robustness.{md,json,png}
    python benchmarks/robustness.py --from-json benchmarks/results/robustness.json   # the table again

Paper section 4.1.1 claims that updating the flattest layer resists relearning. For each scenario
and seed this trains (or loads from the cache shared with ``benchmarks/reproduce.py``) the
poisoned and the retrained model, unlearns with the first-order update under each rule (τ chosen
on validation), then attacks every model the same way (``RelearnAttack(**ATTACK)``): ``steps`` SGD steps
on the first ``samples`` forget samples with their trained (wrong or triggered) labels. Scenarios:

* ``mnist_targeted``: 2,500 nines labelled 7. Relearning shows as class-9 accuracy lost again.
* ``mnist_backdoor``: 500 images with a 3×3 trigger labelled 9. Relearning shows as attack success regained.
* ``mnist_deletion``: 2,500 random images to delete (no corrected labels: the update is gradient
  ascent on D_f). Measured by forget, retain and test accuracy and membership-inference efficacy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    load_clause,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    quiet_lightning,
    rebuilt_from_json,
    recorded_run,
    stat,
    train,
    unlearn_or_refusal,
    write_results,
)

from lightning_sa_unlearn import (  # noqa: E402
    FineTune,
    FirstOrder,
    MembershipInference,
    RelearnAttack,
    StepThenFineTune,
    ValidatedStep,
)
from lightning_sa_unlearn.evaluations import classification_metrics  # noqa: E402
from lightning_sa_unlearn.updates import DEFAULT_LRS  # noqa: E402

SCENARIOS = ("mnist_targeted", "mnist_backdoor", "mnist_deletion")
RULES = ("flattest", "sharpest", "last", "all", "validated_layer", "fine_tune_flattest", "fine_tune_last", "default")
# issue 24's candidate, as a row beside the rules: the flattest layer fine-tuned on D̃_f and 5,000 retain samples,
# the lr among three and the epoch (of at most 5) chosen on validation (the scenario's objective)
CANDIDATES = {
    f"fine_tune_{rule}": lambda objective, rule=rule: dict(
        selection=rule,
        update=FineTune(epochs=5, lr=list(DEFAULT_LRS), retain_samples=5_000, best_epoch=True, objective=objective),
    )
    for rule in ("flattest", "last")
}
# the callback's default (closed form, then that fine-tune) on the last layer, both stages on the scenario's objective
CANDIDATES["default"] = lambda objective: dict(
    selection="last",
    update=StepThenFineTune(
        FirstOrder(ValidatedStep(objective=objective)),
        FineTune(epochs=5, lr=list(DEFAULT_LRS), retain_samples=5_000, best_epoch=True, objective=objective),
    ),
)
# Chosen on the validation split of mnist_targeted, seed 0: the largest lr on the grid 1e-5, 3e-5, 1e-4, 3e-4
# (10 steps) at which the RETRAINED model keeps at least 95% of its class-9 accuracy (96%; at 3e-4 it kept 41%).
# A stronger attack teaches the poison from scratch to any model, and then says nothing about unlearning.
ATTACK = dict(samples=50, steps=10, lr=1e-4)
# Clean validation data cannot see a trigger: with the default objective τ stays near 0 and the attack success
# stays at 99% for every rule (benchmarks/results/robustness_backdoor_clean_validation_seed0.json). The backdoor
# scenario therefore chooses τ on validation loss plus the loss of D_f's triggered inputs under their true labels.
OPTIONS = {"mnist_backdoor": lambda: dict(update=FirstOrder(ValidatedStep(objective="validation_and_forget")))}
# What robustness.json files written before the composable-parts API (which have no "scenarios" entry) say
# about the callback options of each scenario: the same choice, in the old keyword arguments.
LEGACY_OPTIONS = {"mnist_backdoor": "{'tau_objective': 'validation_and_forget'}"}
RETAIN_SAMPLES = 10_000  # retain accuracy is measured on this many retain samples
MIA_SAMPLES = 5000  # the membership-inference attacker trains on this many retain and test samples


def options(scenario: str) -> dict[str, Any]:
    """The scenario's callback parts besides the rule (fresh objects for each run)."""
    return OPTIONS[scenario]() if scenario in OPTIONS else {}


def evaluate(model, datamodule, seed: int) -> dict[str, Any]:
    """Held-out, forget and retain metrics, membership inference, and the relearning attack."""
    result = measure(model, datamodule)
    x_r, y_r = datamodule.retain_set.tensors  # the same first samples for every row, in order
    fixed = [(x_r[i : i + 1000], y_r[i : i + 1000]) for i in range(0, min(RETAIN_SAMPLES, len(y_r)), 1000)]
    result["retain_accuracy"] = classification_metrics(model, fixed, datamodule.num_classes)["accuracy"]
    with quiet_lightning():
        result["mia"] = MembershipInference(samples=MIA_SAMPLES)(model, datamodule, seed=seed)
        result["relearn"] = RelearnAttack(**ATTACK)(model, datamodule, seed=seed)
    return result


def run(scenario: str, seed: int, cache: str, rules: tuple[str, ...] = RULES) -> dict[str, Any]:
    setting = SETTINGS[scenario]
    folder = os.path.join(cache, scenario, f"seed{seed}")
    path = os.path.join(folder, "robustness.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    datamodule = make_datamodule(setting, seed)
    models = {}
    for labels, key in (("poisoned", "poisoned"), ("corrected", "retrained")):
        models[key], _ = train(setting, seed, labels, os.path.join(folder, f"{key}.pt"))
        if key not in results:
            results[key] = evaluate(models[key], datamodule, seed)
    poisoned = models["poisoned"]
    for rule in rules:
        if rule in results:
            continue
        model = make_model(setting)
        model.load_state_dict(poisoned.state_dict())
        parts = {**options(scenario), "selection": rule}
        if rule in CANDIDATES:
            objective = "validation_and_forget" if setting.poison == "backdoor" else "validation"
            parts = CANDIDATES[rule](objective)
        callback = make_callback(setting, seed, **parts)
        report, refusal = unlearn_or_refusal(callback, model, datamodule)
        results[rule] = {
            **evaluate(model, datamodule, seed),
            "selected_layers": report.selected_layers if report else [],
            "tau": report.tau if report else None,
            **refusal,
        }
        print(f"  {scenario} seed {seed} {rule}: {_headline(setting.poison, results[rule])}", flush=True)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    return results


def _headline(poison: str, row: dict[str, Any]) -> str:
    return ", ".join(f"{label} {value:.4f}" for label, value in _metrics(poison, row).items())


def _metrics(poison: str, row: dict[str, Any]) -> dict[str, float]:
    """The columns of one row: after unlearning, then after the relearning attack."""
    heldout, attacked = row["heldout"], row["relearn"]["heldout"]
    out = {"test acc": heldout["accuracy"]}
    if poison == "targeted":
        out["class 9 acc"] = heldout["accuracy_class_9"]
        out["class 9 acc after relearn"] = attacked["accuracy_class_9"]
        out["class 9 acc lost to relearn"] = heldout["accuracy_class_9"] - attacked["accuracy_class_9"]
    elif poison == "backdoor":
        out["attack success"] = heldout["attack_success_rate"]
        out["attack success after relearn"] = attacked["attack_success_rate"]
        out["attack success regained"] = attacked["attack_success_rate"] - heldout["attack_success_rate"]
    else:
        out["forget acc"] = row["forget_trained_labels"]
        out["retain acc"] = row["retain_accuracy"]
        out["forget acc after relearn"] = row["relearn"]["forget_accuracy_trained_labels"]
    out["MIA efficacy"] = row["mia"]["forget_non_member_rate"]
    out["attacker AUC"] = row["mia"]["attacker_auc"]
    out["test acc after relearn"] = attacked["accuracy"]
    return out


def describe(scenario: str) -> dict[str, str]:
    """What the table says about a scenario: its poison, its setting and the callback options besides the rule."""
    setting = SETTINGS[scenario]
    return {"poison": setting.poison, "setting": f"{setting}", "options": f"{options(scenario)}"}


def summarize(results: dict[str, Any], out: str) -> str:
    """Write ``<out>/robustness.md``, ``.json`` (``results`` as given) and ``.png``; returns the markdown.

    The table depends on ``results`` alone. Files written before the composable-parts API have no
    ``scenarios`` entry; their scenarios are described from ``SETTINGS`` and :data:`LEGACY_OPTIONS`.
    """
    attack = results["attack"]
    runs = {scenario: {int(s): row for s, row in seeds.items()} for scenario, seeds in results["runs"].items()}
    scenarios = results.get("scenarios") or {
        scenario: {**describe(scenario), "options": LEGACY_OPTIONS.get(scenario, "{}")} for scenario in runs
    }
    lines = [
        "# Robustness of unlearning: relearning attack, membership inference, backdoor",
        "",
        f"Command: `{results['command']}`",
        "",
        f"First-order update, τ chosen on validation; relearning attack: {attack['steps']} SGD steps of lr "
        f"{attack['lr']} (batch 32, all parameters) on the first {attack['samples']} forget samples with their "
        "trained labels. MIA efficacy: share of D_f that a loss/entropy logistic-regression attacker, trained "
        "on retain (members) against test (non-members), calls non-members; attacker AUC is on its held-out half. "
        "Mean ± std over seeds."
        + (f" {results['torch_threads']} torch threads." if "torch_threads" in results else "")
        + load_clause(results.get("load_average")),
    ]
    for scenario, seeds in runs.items():
        rows = _rows(seeds)
        poison = scenarios[scenario]["poison"]
        header = list(_metrics(poison, seeds[next(iter(seeds))]["poisoned"]))
        lines += [
            "",
            f"## {scenario} (seeds {sorted(seeds)})",
            "",
            f"Setting: {scenarios[scenario]['setting']}; callback options {scenarios[scenario]['options']}",
            "",
            "| model | " + " | ".join(header) + " | layers picked |",
            "|---|" + "---|" * (len(header) + 1),
        ]
        for row in rows:
            values = [_metrics(poison, seeds[s][row]) for s in sorted(seeds)]
            cells = [stat([v[column] for v in values]) for column in header]
            picked = sorted({", ".join(seeds[s][row].get("selected_layers", [])) for s in sorted(seeds)} - {""})
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {'; '.join(picked)} |")
    text = "\n".join(lines) + "\n"
    write_results(out, "robustness", text, results)
    _plot(runs, {scenario: scenarios[scenario]["poison"] for scenario in runs}, os.path.join(out, "robustness.png"))
    return text


def _rows(seeds: dict[int, dict]) -> list[str]:
    """The models every seed of a scenario has, in table order (a run may be limited with ``--rules``)."""
    return [row for row in ("poisoned", "retrained", *RULES) if all(row in run for run in seeds.values())]


def _plot(runs: dict[str, dict[int, dict]], poisons: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {
        "targeted": "class 9 acc lost to relearn",
        "backdoor": "attack success regained",
        "deletion": "MIA efficacy",
    }
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False)
    for ax, scenario in zip(axes[0], runs):
        rows = _rows(runs[scenario])
        seeds, poison = runs[scenario], poisons[scenario]
        means, errors = [], []
        for row in rows:
            values = [100 * _metrics(poison, seeds[s][row])[columns[poison]] for s in seeds]
            means.append(statistics.fmean(values))
            errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        colors = ["gray", "black", "tab:green", "tab:red", "tab:orange", "tab:blue", "tab:purple"]
        ax.bar(rows, means, yerr=errors, color=colors[: len(rows)])
        ax.set_title(f"{scenario}: {columns[poison]} (points)", fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), help=f"settings, default {SCENARIOS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES, help=f"default {RULES}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache", default="cache/benchmarks")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="train and attack nothing: rebuild the table and plot of a robustness.json into --out",
    )
    args = parser.parse_args(argv)
    if rebuilt_from_json(args.from_json, lambda results: summarize(results, args.out)):
        return

    def every_run() -> dict[str, dict[int, dict]]:
        runs: dict[str, dict[int, dict]] = {}
        for scenario in args.scenarios:
            for seed in args.seeds:
                print(f"[{scenario}] seed {seed}", flush=True)
                runs.setdefault(scenario, {})[seed] = run(scenario, seed, args.cache, tuple(args.rules))
        return runs

    results = recorded_run("robustness.py", argv, args.threads, every_run)
    results |= {"attack": ATTACK, "scenarios": {scenario: describe(scenario) for scenario in results["runs"]}}
    print(summarize(results, args.out))


if __name__ == "__main__":
    main()
