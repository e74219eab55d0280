"""The tables and the plot of benchmarks/discovery.py (issue #25), from its rows."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

RETRAIN = "retrained without the identified samples"
SECOND = "second round: defaults on D_f + flagged candidates"


def methods(rows: list[dict]) -> dict[str, Callable[[dict], float | None]]:
    """Column name -> the gap restored (a share) that a row gives it, None where the row has none."""
    names = list(dict.fromkeys(name for row in rows for name in row["methods"]))
    picks: dict[str, Callable[[dict], float | None]] = {
        name: (lambda row, name=name: row["methods"].get(name, {}).get("gap_restored")) for name in names
    }
    picks[RETRAIN] = lambda row: row.get("retrain_without_identified", {}).get("gap_restored")
    picks[SECOND] = lambda row: row.get("second_round", {}).get("gap_restored")
    return picks


def values(rows: list[dict], q: float, pick: Callable[[dict], Any]) -> list[float]:
    return [v for row in rows if row["discovered"] == q and (v := pick(row)) is not None]


def summary(xs: list[float], scale: float = 100, digits: int = 0) -> str:
    """``mean ± sd (min …)`` of ``xs`` times ``scale``; ``-`` when empty."""
    if not xs:
        return "-"
    xs = [scale * x for x in xs]
    sd = f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):.{digits}f}{sd} (min {min(xs):.{digits}f})"


def table(setting: str, rows: list[dict], command: str, threads: int, load: list[list[float]]) -> str:
    shares = sorted({row["discovered"] for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    picks = methods(rows)
    lines = [
        f"# Issue #25: part of the poison known ({setting}, seeds {', '.join(map(str, seeds))})",
        "",
        f"Command: `{command}`; {threads} torch thread(s); load average before {load[0][0]:.2f}, after "
        f"{load[-1][0]:.2f}. D_f = the known share of the poison; the rest stays in D_r with its wrong labels. "
        "Gap restored on the held-out test set against the model retrained on the corrected labels "
        "(mean ± sd over seeds, and the lowest seed). Precision at k = recall at k, k = the number of unidentified "
        "poisoned samples, ranking D_r with rank_suspects (the poisoned model against the defaults' result). "
        "Flagged: the samples whose trained label lost at least half its probability (score > ln 2); the second "
        "round unlearns the poisoned model again with them added to D_f (in D̃_f with the unlearned model's most "
        "probable other class). "
        "Whole round = first unlearning + ranking + second unlearning, in % of training units.",
        "",
        "## Gap restored %, by share discovered",
        "",
        "| discovered | " + " | ".join(picks) + " |",
        "|---" * (len(picks) + 1) + "|",
    ]
    for q in shares:
        lines.append(f"| {q:g} | " + " | ".join(summary(values(rows, q, pick)) for pick in picks.values()) + " |")
    lines += [
        "",
        "## Finding the rest, and cost (% of training units)",
        "",
        "| discovered | precision at k | flagged | flagged precision | flagged recall | defaults units % | "
        "ranking units % | whole round units % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = next(iter(picks))
    for q in shares:
        ranking = lambda key: values(rows, q, lambda r: r.get("ranking", {}).get(key))  # noqa: E731
        lines.append(
            f"| {q:g} | {summary(ranking('precision_at_k'), 1, 3)} | {summary(ranking('candidates'), 1)} | "
            f"{summary(ranking('candidate_precision'), 1, 3)} | {summary(ranking('candidate_recall'), 1, 3)} | "
            f"{summary(values(rows, q, lambda r: r['methods'][first]['units_percent']), 1, 2)} | "
            f"{summary(ranking('units_percent'), 1, 2)} | "
            f"{summary(values(rows, q, lambda r: r.get('round_units_percent')), 1, 2)} |"
        )
    header = ["seed", "discovered", "known", "unidentified", *picks, "precision at k", "whole round units %"]
    lines += ["", "## Every run: gap restored %", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        gaps = " | ".join("-" if (v := pick(row)) is None else f"{100 * v:.0f}" for pick in picks.values())
        precision = row.get("ranking", {}).get("precision_at_k")
        cost = row.get("round_units_percent")
        lines.append(
            f"| {row['seed']} | {row['discovered']:g} | {row['known']} | {row['unidentified']} | {gaps} | "
            f"{'-' if precision is None else f'{precision:.3f}'} | {'-' if cost is None else f'{cost:.2f}'} |"
        )
    refused = [(row["seed"], row["discovered"], n) for row in rows for n, m in row["methods"].items() if "refused" in m]
    if refused:
        lines += ["", "Refused by the harm guard (the model kept as it was): " + "; ".join(map(str, refused)) + "."]
    return "\n".join(lines) + "\n"


def plot(setting: str, rows: list[dict], path: str) -> None:
    """Gap restored against the share discovered: mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({row["discovered"] for row in rows})
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (name, pick), marker in zip(methods(rows).items(), "osd^vx"):
        points = [(q, statistics.mean(v)) for q in shares if (v := values(rows, q, pick))]
        if points:
            ax.plot([q for q, _ in points], [100 * m for _, m in points], marker + "-", label=name)
    ax.axhline(100, color="grey", linestyle=":", label="retrained on the corrected labels")
    ax.set_xscale("log")
    ax.set_xlabel("share of the poison discovered")
    ax.set_ylabel("held-out gap restored % (mean over seeds)")
    ax.set_title(f"{setting}: part of the poison known")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TARGET_SHARE = 0.25


def targets(rows: list[dict]) -> dict[str, Any]:
    """Issue #25's targets on mnist_targeted: at 25% discovered, the defaults restore ≥ 80% of the gap (mean over
    seeds) and the top k holds ≥ 0.8 unidentified poison; at every share below 1 the defaults restore more of the
    gap than retraining without the identified samples (means); the whole round costs ≤ 15% of training units."""
    picks = methods(rows)
    defaults = next(iter(picks.values()))
    below_one = sorted({row["discovered"] for row in rows if row["discovered"] < 1})
    at = [row for row in rows if row["discovered"] == TARGET_SHARE]
    beats = {
        f"{q:g}": statistics.mean(values(rows, q, defaults)) > statistics.mean(values(rows, q, picks[RETRAIN]))
        for q in below_one
        if values(rows, q, picks[RETRAIN])
    }
    pairs = [(defaults(r), picks[RETRAIN](r)) for r in rows if r["discovered"] < 1 and picks[RETRAIN](r) is not None]
    gap = 100 * statistics.mean(values(rows, TARGET_SHARE, defaults)) if at else None
    precision = statistics.mean(values(rows, TARGET_SHARE, lambda r: r["ranking"]["precision_at_k"])) if at else None
    rounds = [v for row in rows if (v := row.get("round_units_percent")) is not None]
    return {
        "gap_restored_at_0.25_mean": gap,
        "gap_restored_at_0.25_met": gap is not None and gap >= 80,
        "beats_retraining_without_identified": beats,
        "beats_retraining_met": bool(beats) and len(beats) == len(below_one) and all(beats.values()),
        "runs_beating_retraining": [sum(ours > theirs for ours, theirs in pairs), len(pairs)],
        "precision_at_k_at_0.25_mean": precision,
        "precision_met": precision is not None and precision >= 0.8,
        "whole_round_units_percent_max": max(rounds) if rounds else None,
        "cost_met": bool(rounds) and max(rounds) <= 15,
    }


def verdicts(result: dict[str, Any] | None) -> str:
    """The targets as a short section of the table; empty without targets."""
    if result is None:
        return ""
    met = lambda key: "met" if result[key] else "missed"  # noqa: E731
    beats = ", ".join(
        f"{q}: {'yes' if won else 'no'}" for q, won in result["beats_retraining_without_identified"].items()
    )
    won, runs = result["runs_beating_retraining"]
    return (
        "\n## Issue #25's targets\n\n"
        f"- At 25% discovered, gap restored {result['gap_restored_at_0.25_mean']:.1f}% (≥ 80%): "
        f"{met('gap_restored_at_0.25_met')}.\n"
        f"- More of the gap than retraining without the identified samples at every share below 1 ({beats}; "
        f"in {won} of {runs} runs): {met('beats_retraining_met')}.\n"
        f"- Precision at k at 25% discovered {result['precision_at_k_at_0.25_mean']:.3f} (≥ 0.8): "
        f"{met('precision_met')}.\n"
        f"- Whole round (unlearn, rank, unlearn again) at most {result['whole_round_units_percent_max']:.2f}% of "
        f"training units (≤ 15%): {met('cost_met')}.\n"
    )
