"""Issue #24's targets from committed results: ``targets.json`` for a script to check, and one plot per setting.

    python benchmarks/targets.py --out benchmarks/results/v0_3

Reads ``<out>/mnist_targeted.json``, ``cifar10_cpu.json`` (``reproduce.py``), ``backdoor.json``
(``backdoor.py``) and ``cifar10_deletion.json`` (``reproduce.py``), those present, and writes
``<out>/targets.json`` and ``<out>/gap_vs_cost_<setting>.png``: gap restored (or, for deletion, the
distance to the retrained model) against cost in % of training units, one point per method with a cost.
Every number is read from the results files; nothing is trained or measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

DEFAULT = "step then fine-tune, last layer"
"""The callback's default (``selection="last"``, ``update="step_then_fine_tune"``): its row in each setting."""
BACKDOOR = "step then fine-tune, last layer, best of 10 epochs, D̃_f = triggered inputs, true labels"
"""The backdoor recipe: the default update with 10 epochs, ``validation_and_forget`` and the triggered D̃_f."""

TARGETS = {
    "mnist_targeted": {"gap_restored_mean": (">=", 98.0), "gap_restored_min": (">=", 85.0)},
    "cifar10_cpu": {"gap_restored_mean": (">=", 95.0), "class_gap_restored_mean": (">=", 95.0)},
    "mnist_backdoor": {"asr_minus_retrained_mean": ("<=", 2.0), "clean_minus_retrained_mean": (">=", -1.0)},
    "cifar10_deletion": {
        "forget_acc_diff_mean": ("<=", 2.0),
        "mia_auc_diff_mean": ("<=", 0.03),
        "heldout_diff_mean": ("<=", 1.0),
    },
}
UNITS_PERCENT_MAX = 5.0


def _gap(after: float, poisoned: float, retrained: float) -> float:
    return 100 * (after - poisoned) / (retrained - poisoned)


def label_entry(runs: dict[str, dict], method: str) -> dict[str, Any]:
    """Gap restored on held-out data (and on class 9) per seed, for a label setting's method."""
    seeds = [s for s in runs if method in runs[s]]
    gaps, class_gaps = [], []
    for s in seeds:
        p, r, m = (runs[s][k]["heldout"] for k in ("poisoned", "retrained", method))
        gaps.append(_gap(m["accuracy"], p["accuracy"], r["accuracy"]))
        class_gaps.append(_gap(m["accuracy_class_9"], p["accuracy_class_9"], r["accuracy_class_9"]))
    return {
        "gap_restored_mean": statistics.mean(gaps),
        "gap_restored_min": min(gaps),
        "class_gap_restored_mean": statistics.mean(class_gaps),
        **_common(runs, seeds, method),
    }


def backdoor_entry(runs: dict[str, dict], method: str) -> dict[str, Any]:
    """Attack success rate and clean accuracy against the retrained model's, in accuracy points."""
    seeds = [s for s in runs if method in runs[s]]
    asr = [100 * (runs[s][method]["asr"] - runs[s]["retrained"]["asr"]) for s in seeds]
    clean = [100 * (runs[s][method]["accuracy"] - runs[s]["retrained"]["accuracy"]) for s in seeds]
    return {
        "asr_minus_retrained_mean": statistics.mean(asr),
        "clean_minus_retrained_mean": statistics.mean(clean),
        **_common(runs, seeds, method),
    }


def deletion_entry(runs: dict[str, dict], method: str) -> dict[str, Any]:
    """Absolute differences from the retrained model: D_f accuracy and held-out accuracy (points), loss-threshold
    membership AUC (AUC units)."""
    seeds = [s for s in runs if method in runs[s]]

    def diff(pick) -> float:
        return statistics.mean(abs(pick(runs[s][method]) - pick(runs[s]["retrained"])) for s in seeds)

    return {
        "forget_acc_diff_mean": 100 * diff(lambda row: row["forget_true_labels"]),
        "heldout_diff_mean": 100 * diff(lambda row: row["heldout"]["accuracy"]),
        "mia_auc_diff_mean": diff(lambda row: row["loss_threshold_auc"]),
        **_common(runs, seeds, method),
    }


def _common(runs: dict[str, dict], seeds: list[str], method: str) -> dict[str, Any]:
    costs = [runs[s][method].get("cost", {}).get("units_percent") for s in seeds]
    return {
        "method": method,
        "seeds": len(seeds),
        "units_percent_max": max(costs) if costs and None not in costs else None,
    }


def judge(setting: str, entry: dict[str, Any]) -> dict[str, bool]:
    """Each target of ``setting`` (and the cost target): met or not."""
    checks = {
        key: entry[key] >= bound if op == ">=" else entry[key] <= bound for key, (op, bound) in TARGETS[setting].items()
    }
    checks["units_percent_max"] = (
        entry["units_percent_max"] is not None and entry["units_percent_max"] <= UNITS_PERCENT_MAX
    )
    checks["seeds"] = entry["seeds"] >= (5 if setting == "mnist_targeted" else 3)
    return checks


ENTRIES = {
    "mnist_targeted": ("mnist_targeted.json", DEFAULT, label_entry),
    "cifar10_cpu": ("cifar10_cpu.json", DEFAULT, label_entry),
    "mnist_backdoor": ("backdoor.json", BACKDOOR, backdoor_entry),
    "cifar10_deletion": ("cifar10_deletion.json", DEFAULT, deletion_entry),
}


def plot(setting: str, runs: dict[str, dict], path: str) -> None:
    """Gap restored (deletion: D_f accuracy distance to retrained) against cost, one point per method with a cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deletion = setting == "cifar10_deletion"
    methods = sorted({m for r in runs.values() for m, row in r.items() if isinstance(row, dict) and "cost" in row})
    fig, ax = plt.subplots(figsize=(8, 6))
    for method in methods:
        if setting == "mnist_backdoor":
            y = backdoor_entry(runs, method)["asr_minus_retrained_mean"]
        elif deletion:
            y = deletion_entry(runs, method)["forget_acc_diff_mean"]
        else:
            y = label_entry(runs, method)["gap_restored_mean"]
        x = max(runs[s][method]["cost"]["units_percent"] for s in runs if method in runs[s])
        label = method if len(method) < 70 else method[:67] + "..."
        seeds = sum(method in run for run in runs.values())
        label += f" ({seeds} of {len(runs)} seeds)" if seeds < len(runs) else ""
        ax.scatter([x], [y], s=40, label=label)
    reference = 0.0 if setting in ("mnist_backdoor", "cifar10_deletion") else 100.0
    ax.scatter([100.0], [reference], marker="*", s=120, color="black", label="retrained from scratch")
    ax.axvline(UNITS_PERCENT_MAX, color="grey", linestyle=":", label=f"cost target {UNITS_PERCENT_MAX:g}%")
    ax.set_xscale("log")
    ax.set_xlabel("cost, % of training units (largest over seeds)")
    ax.set_ylabel(
        "ASR − retrained ASR (points)"
        if setting == "mnist_backdoor"
        else "|D_f acc − retrained| (points)"
        if deletion
        else "held-out gap restored % (retrained = 100)"
    )
    ax.set_title(f"{setting}: quality against cost (mean over seeds)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/v0_3")
    args = parser.parse_args(argv)
    summary: dict[str, Any] = {}
    for setting, (file, method, entry_of) in ENTRIES.items():
        path = os.path.join(args.out, file)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            runs = json.load(f)["runs"]
        entry = entry_of(runs, method)
        summary[setting] = {**entry, "targets_met": judge(setting, entry), "source": file}
        plot(setting, runs, os.path.join(args.out, f"gap_vs_cost_{setting}.png"))
    with open(os.path.join(args.out, "targets.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
