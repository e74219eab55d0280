"""The ``validated_layer`` rule against the layer sweep and the fixed rules (issue 14), for ``reproduce.py``'s table.

Not a script: ``benchmarks/reproduce.py`` appends these lines to its table when a results file has the
rule's row. Everything is per seed and paired: the rule's held-out accuracy against the seed's best
single layer (the sweep, measured on the test set, so no user could pick it), against the better of
the flattest and the last layer on that seed, and its unlearning seconds against the flattest layer's.
"""

from __future__ import annotations

import math
import statistics

from sweep import RULE_METHODS

METHOD = "SA first-order, validated_layer"
FLATTEST, LAST = RULE_METHODS["flattest"], RULE_METHODS["last"]


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (std / √n; 0 for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def validated_lines(runs: dict[int, dict], seeds: list[int]) -> list[str]:
    """The rule's shortfall, picks, trials, paired differences and cost; empty without the rule's row (seeds where
    the harm guard refused one of the three runs are left out: they have no report)."""
    seeds = [s for s in seeds if all(runs[s].get(key, {}).get("report") for key in (METHOD, FLATTEST, LAST))]
    layered = [s for s in seeds if any(key.startswith("layer ") for key in runs[s])]
    if not seeds:
        return []
    accuracy = {s: runs[s][METHOD]["heldout"]["accuracy"] for s in seeds}
    better = {s: max(runs[s][FLATTEST]["heldout"]["accuracy"], runs[s][LAST]["heldout"]["accuracy"]) for s in seeds}
    lines = ["", "## validated_layer: curvature proposes, validation decides", ""]
    if layered:
        shortfalls, hits, picks = [], 0, []
        for s in layered:
            sweep = {k[6:]: run["heldout"]["accuracy"] for k, run in runs[s].items() if k.startswith("layer ")}
            best = max(sweep, key=sweep.get)
            pick = runs[s][METHOD]["report"]["selected_layers"][0]
            hits += pick == best
            shortfalls.append(100 * (sweep[best] - accuracy[s]))
            picks.append(pick)
        lines += [
            "| rule | picks the best layer in | shortfall from the best layer (points) | layers it picked |",
            "|---|---|---|---|",
            f"| validated_layer | {hits} of {len(layered)} seeds | {_mean_std(shortfalls, 1.0)} | {', '.join(picks)} |",
            "",
        ]
    diff = [accuracy[s] - better[s] for s in seeds]
    mean_diff, se_diff = _mean_se(diff)
    by_rule = {key: statistics.fmean(runs[s][key]["heldout"]["accuracy"] for s in seeds) for key in (FLATTEST, LAST)}
    best_rule = max(by_rule, key=by_rule.get)
    mean_ours = statistics.fmean(accuracy.values())
    ratio = [
        runs[s][METHOD]["report"]["seconds"]["unlearning"] / runs[s][FLATTEST]["report"]["seconds"]["unlearning"]
        for s in seeds
    ]
    wall = [runs[s][METHOD]["seconds"] / runs[s][FLATTEST]["seconds"] for s in seeds]
    apart = [  # without the curvature pass, which both runs make once and which dominates here
        _without_curvature(runs[s][METHOD]) / _without_curvature(runs[s][FLATTEST]) for s in seeds
    ]
    lines += [
        "| seed | validated_layer held-out % | flattest % | last % | validated − max(flattest, last) (points) "
        "| unlearning s: validated / flattest | its winner's τ |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, d, r in zip(seeds, diff, ratio):
        tau = runs[s][METHOD]["report"].get("tau")
        lines.append(
            f"| {s} | {100 * accuracy[s]:.2f} | {100 * runs[s][FLATTEST]['heldout']['accuracy']:.2f} | "
            f"{100 * runs[s][LAST]['heldout']['accuracy']:.2f} | {100 * d:+.2f} | {r:.2f}× | "
            f"{'-' if tau is None else f'{tau:.3g}'} |"
        )
    held = mean_ours >= by_rule[best_rule] - se_diff
    lines += [
        "",
        f"Paired difference validated − max(flattest, last) per seed: {100 * mean_diff:+.2f} ± {100 * se_diff:.2f} "
        f"points (mean ± standard error, {len(seeds)} seeds). Mean held-out accuracy: validated_layer "
        f"{100 * mean_ours:.2f}%, the better rule on the mean ({best_rule}) {100 * by_rule[best_rule]:.2f}%, "
        f"per-seed better of the two {100 * statistics.fmean(better.values()):.2f}%. Target (validated ≥ better rule "
        f"− one SE of the paired difference): {'held' if held else 'missed'}.",
        "",
        f"Cost: the report's unlearning seconds (forget gradient, curvature, selection, update, guard) of "
        f"validated_layer over those of the flattest single-layer run of the sweep: {_mean_std(ratio, 1.0)}× "
        f"(max {max(ratio):.2f}×); without the curvature pass both make: {_mean_std(apart, 1.0)}× "
        f"(max {max(apart):.2f}×); wall seconds including held-out reporting: {_mean_std(wall, 1.0)}×. "
        "Target ≤ 4×.",
    ]
    return lines + _trial_lines(runs, seeds)


def _without_curvature(row: dict) -> float:
    seconds = row["report"]["seconds"]
    return seconds["unlearning"] - seconds.get("curvature", 0.0)


def _trial_lines(runs: dict[int, dict], seeds: list[int]) -> list[str]:
    """Each candidate's validation objective and τ per seed (results files that kept the trials)."""
    trials = {s: runs[s][METHOD]["report"].get("selection_trials") for s in seeds}
    if not all(trials.values()):
        return []
    lines = ["", "| seed | candidate: validation objective (τ), chosen in bold |", "|---|---|"]
    for s in seeds:
        cells = []
        for t in trials[s]:
            tau = "-" if t["tau"] is None else f"{t['tau']:.2g}"
            cell = f"{t['layers'][0]}: {t['validation_objective']:.4f} ({tau})"
            cells.append(f"**{cell}**" if t["chosen"] else cell)
        lines.append(f"| {s} | {'; '.join(cells)} |")
    return lines
