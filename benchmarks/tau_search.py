"""The cheap τ search against version 0.1's grid on the same fitted models (issue #13), from a reproduce.py cache.

    python benchmarks/reproduce.py --setting mnist_targeted --methods "SA first-order, flattest, v0.1 grid"
    python benchmarks/tau_search.py --cache cache/benchmarks/mnist_targeted   # writes results/v0_2/tau_search_*.md

The layer sweep's run of ``net.fc1`` is the first-order update with the default golden-section search on the layer
that the flattest rule picks; the "v0.1 grid" row is the same update with ``ValidatedStep(search="grid")``
(10 points on the whole validation split). Gap restored = (after − poisoned) / (retrained − poisoned), held-out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line  # noqa: E402

ROWS = {
    "golden-section search (0.2 default), flattest layer": "layer net.fc1",
    "10-point grid on the whole validation split (0.1)": "SA first-order, flattest, v0.1 grid",
    "golden-section search, last layer": "layer net.fc2",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="cache/benchmarks/mnist_targeted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="benchmarks/results/v0_2/tau_search_mnist_targeted.md")
    args = parser.parse_args(argv)
    runs = [json.load(open(os.path.join(args.cache, f"seed{s}", "results.json"))) for s in args.seeds]
    lines = [
        "# τ search: the 0.2 golden-section search against 0.1's grid, on the same models",
        "",
        f"Command: `{command_line('tau_search.py', argv)}` "
        f"(reads the cache of `reproduce.py --setting mnist_targeted`); seeds {args.seeds}; mean ± std.",
        "",
        "| τ search | held-out acc % | gap restored % | per seed % | unlearning s |",
        "|---|---|---|---|---|",
    ]
    for name, key in ROWS.items():
        accuracy, gaps, seconds = [], [], []
        for run in runs:
            poisoned, retrained = run["poisoned"]["heldout"]["accuracy"], run["retrained"]["heldout"]["accuracy"]
            after = run[key]["heldout"]["accuracy"]
            accuracy.append(100 * after)
            gaps.append(100 * (after - poisoned) / (retrained - poisoned))
            seconds.append(run[key]["report"]["seconds"].get("unlearning", float("nan")))
        lines.append(
            f"| {name} | {statistics.fmean(accuracy):.2f} ± {statistics.stdev(accuracy):.2f} | "
            f"{statistics.fmean(gaps):.0f} ± {statistics.stdev(gaps):.0f} | {', '.join(f'{g:.0f}' for g in gaps)} | "
            f"{statistics.fmean(seconds):.2f} |"
        )
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
