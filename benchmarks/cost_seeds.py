"""Cost and gap restored over several seeds: ``cost.py`` once per seed, then mean ± std (issue #13's 5-seed target).

    python benchmarks/cost_seeds.py --setting mnist_targeted --seeds 0 1 2 3 4 --cache cache/benchmarks \\
        --methods 'SA first order, flattest (defaults)' 'first order, last layer'

Each seed's table and JSON go to ``<out>/cost_seeds/``; the summary to ``<out>/cost_<setting>_seeds.md``.
With ``--cache``, the fitted models (and their training seconds) come from a ``reproduce.py`` cache, so
percentages of training seconds use seconds recorded there; units do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cost  # noqa: E402
from common import command_line  # noqa: E402


def mean_std(values: list[float], digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="mnist_targeted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    folder = os.path.join(args.out, "cost_seeds")
    per_seed = {}
    for seed in args.seeds:
        options = ["--setting", args.setting, "--seed", str(seed), "--runs", str(args.runs), "--out", folder]
        options += ["--cache", args.cache] if args.cache else []
        options += ["--methods", *args.methods] if args.methods else []
        path = os.path.join(folder, f"cost_{args.setting}.json")
        cost.main(options)
        os.replace(path, os.path.join(folder, f"cost_{args.setting}_seed{seed}.json"))
        os.replace(path[: -len(".json")] + ".md", os.path.join(folder, f"cost_{args.setting}_seed{seed}.md"))
        with open(os.path.join(folder, f"cost_{args.setting}_seed{seed}.json")) as f:
            per_seed[seed] = json.load(f)
    load = os.getloadavg()
    lines = [
        f"# Cost and gap restored over seeds: {args.setting}",
        "",
        f"Command: `{command_line('cost_seeds.py', argv)}`",
        "",
        f"Seeds {args.seeds}; mean ± std over seeds; each seed's table in [cost_seeds/](cost_seeds/). Load average "
        f"after the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. Training seconds "
        f"{'recorded in the cache' if args.cache else 'measured in each run'}.",
        "",
        "| method | % of training (s) | % of training (units) | gap restored % | per seed: units %, gap % |",
        "|---|---|---|---|---|",
    ]
    methods = list(next(iter(per_seed.values()))["rows"])
    for name in methods:
        seconds, units, gaps = [], [], []
        for result in per_seed.values():
            row = result["rows"][name]
            seconds.append(100 * row["seconds"]["unlearning"] / result["training_seconds"])
            units.append(100 * row["unlearning_units"] / result["training_units"])
            damage = result["retrained_accuracy"] - result["poisoned_accuracy"]
            gaps.append(100 * (row["heldout_after"] - result["poisoned_accuracy"]) / damage)
        seeds = ", ".join(f"{u:.2f}, {g:.0f}" for u, g in zip(units, gaps))
        lines.append(f"| {name} | {mean_std(seconds)} | {mean_std(units)} | {mean_std(gaps, 0)} | {seeds} |")
    damages = [100 * (r["retrained_accuracy"] - r["poisoned_accuracy"]) for r in per_seed.values()]
    lines += ["", f"Damage (retrained − poisoned held-out accuracy): {mean_std(damages)} points."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, f"cost_{args.setting}_seeds.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
