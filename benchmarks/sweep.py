"""The layer sweep (paper Figure 1): per-layer gains, and each rule's shortfall from the seed's best swept layer.

A rule that picks a layer outside the sweep (on ResNet-20 the sweep covers each block's last convolution and the
classifier) is read from the rule's own method run; a rule run on neither is left out of the shortfall table.
"""

from __future__ import annotations

import statistics

from lightning_sa_unlearn.selection import select_layers

RULES = ("flattest", "sharpest", "last", "newton_decrement")
RULE_METHODS = {
    "flattest": "SA first-order, flattest",
    "sharpest": "SA first-order, sharpest",
    "last": "first-order, last layer",
    "newton_decrement": "first-order, newton_decrement",
}
"""The method row that runs each rule (read when the rule picks a layer the sweep did not cover)."""


def layer_runs(run: dict) -> dict[str, dict]:
    return {key[len("layer ") :]: value for key, value in run.items() if key.startswith("layer ")}


def seeds_with_sweep(runs: dict[int, dict], seeds: list[int]) -> list[int]:
    """The seeds whose runs include the sweep (``reproduce.py --skip-sweep`` leaves it out), with a run the harm
    guard kept (the per-layer scores come from its report)."""
    return [s for s in seeds if any(run.get("report") for run in layer_runs(runs[s]).values())]


def scores(swept: dict[str, dict]) -> dict:
    """The report of a seed's first sweep run that has one: every run measures the per-layer scores alike, and
    a run the harm guard refused has no report."""
    return next(run["report"] for run in swept.values() if run.get("report"))


def sweep_table(runs: dict[int, dict], seeds: list[int]) -> dict[str, tuple[list[float], list[float]]]:
    """``{layer: (mean Hessian diagonal per seed, held-out accuracy gain per seed)}`` of the layer sweep."""
    seeds = seeds_with_sweep(runs, seeds)
    if not seeds:
        return {}
    layers = list(layer_runs(runs[seeds[0]]))
    out = {}
    for layer in layers:
        sweeps = [layer_runs(runs[s])[layer] for s in seeds]
        sharpness = [scores(layer_runs(runs[s]))["layer_sharpness"][layer] for s in seeds]
        gains = [
            sweep["heldout"]["accuracy"] - runs[s]["poisoned"]["heldout"]["accuracy"] for sweep, s in zip(sweeps, seeds)
        ]
        out[layer] = (sharpness, gains)
    return out


def sweep_lines(runs: dict[int, dict], seeds: list[int]) -> list[str]:
    table = sweep_table(runs, seeds)
    if not table:
        return []
    seeds = seeds_with_sweep(runs, seeds)
    lines = [
        "",
        "## Layer sweep (Figure 1): first-order update of one layer at a time",
        "",
        "| layer | mean Hessian diagonal | held-out accuracy gain (points) |",
        "|---|---|---|",
    ]
    for layer, (sharpness, gains) in table.items():
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(
            f"| {layer} | {statistics.fmean(sharpness):.3e} | "
            f"{100 * statistics.fmean(gains):+.2f} ± {100 * spread:.2f} |"
        )
    lines += [
        "",
        "Shortfall: how many points of held-out accuracy the rule's layer gains less than the seed's best layer.",
        "",
        "| rule | picks the best layer in | shortfall from the best layer (points) | layers it picked |",
        "|---|---|---|---|",
    ]
    for rule in RULES:
        hits, picks, shortfalls = 0, [], []
        for s in seeds:
            swept = layer_runs(runs[s])
            first = scores(swept)
            by_layer = first["newton_decrement"] if rule == "newton_decrement" else first["layer_sharpness"]
            pick = select_layers(by_layer, rule)[0]
            accuracy = {layer: run["heldout"]["accuracy"] for layer, run in swept.items()}
            best = max(accuracy, key=accuracy.get)
            own = runs[s].get(RULE_METHODS[rule])  # a pick outside the sweep: the rule's own run
            picked = accuracy.get(pick, own["heldout"]["accuracy"] if own is not None else None)
            if picked is None:
                break
            hits += pick == best
            shortfalls.append(100 * (accuracy[best] - picked))
            picks.append(pick)
        if len(shortfalls) < len(seeds):  # neither swept nor run on every seed
            continue
        spread = statistics.stdev(shortfalls) if len(shortfalls) > 1 else 0.0
        lines.append(
            f"| {rule} | {hits} of {len(seeds)} seeds | {statistics.fmean(shortfalls):.2f} ± {spread:.2f} | "
            f"{', '.join(picks)} |"
        )
    return lines


def plot_sweep(runs: dict[int, dict], seeds: list[int], path: str, title: str) -> None:
    table = sweep_table(runs, seeds)
    if not table:
        return
    seeds = seeds_with_sweep(runs, seeds)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(layers, [statistics.fmean(table[layer][0]) for layer in layers], color="tab:blue")
    left.set_yscale("log")
    left.set_title("mean Hessian diagonal")
    right.bar(layers, [100 * statistics.fmean(table[layer][1]) for layer in layers], color="tab:green")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_title("held-out accuracy gain (points)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{title}: per-layer first-order unlearning, mean over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
