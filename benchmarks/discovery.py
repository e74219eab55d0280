"""Issue #25, first measurement: unlearning when only part of the poison is known, and finding the rest.

    python benchmarks/discovery.py --seeds 0 --discovered 0.25 --cache cache/benchmarks --out benchmarks/results/v0_3

For each seed and discovered share q: the defaults unlearn the cached poisoned mnist_targeted model (reproduce.py's:
the poisoned samples do not depend on q) from a datamodule whose D_f is a seeded share q of the poison; the rest
stays in D_r with its wrong labels. Then :func:`~lightning_sa_unlearn.discovery.rank_suspects` ranks D_r by the rise
of each sample's loss under its trained label, and the top k (k = the number of unidentified poisoned samples) is
scored against the truth: precision = recall at that k. Gap restored against the same retrained model as
reproduce.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    command_line,
    default_parts,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    train,
    unlearning_cost,
)

from lightning_sa_unlearn.discovery import rank_suspects  # noqa: E402

SCENARIO = "mnist_targeted"


def run(seed: int, discovered: float, cache: str) -> dict:
    setting = SETTINGS[SCENARIO]
    folder = os.path.join(cache, SCENARIO, f"seed{seed}")
    poisoned, _ = train(setting, seed, "poisoned", os.path.join(folder, "poisoned.pt"))
    retrained, _ = train(setting, seed, "corrected", os.path.join(folder, "retrained.pt"))
    data = make_datamodule(setting, seed, discovered=discovered)
    model = make_model(setting)
    model.load_state_dict(poisoned.state_dict())
    callback = make_callback(setting, seed, curvature=None, **default_parts())
    report = callback.unlearn(model, data)
    # positions in D_r of the unidentified poison: D_r is train_set without D_f, in train_set order
    in_retain = torch.ones(len(data.train_set), dtype=torch.bool)
    in_retain[data.poisoned_positions] = False
    in_retain[data.unidentified_positions] = True  # everything but D_f
    retain_position = torch.cumsum(in_retain.long(), 0) - 1
    truth = set(retain_position[data.unidentified_positions].tolist())
    suspects = rank_suspects(model, data.retain_dataloader(), before=poisoned)
    k = len(truth)
    found = len(truth & set(suspects.top(k).tolist()))
    p, r, m = (measure(x, data)["heldout"]["accuracy"] for x in (poisoned, retrained, model))
    return {
        "seed": seed,
        "discovered": discovered,
        "known": len(data.forget_set),
        "unidentified": k,
        "heldout": {"poisoned": p, "retrained": r, "after": m},
        "gap_restored": (m - p) / (r - p),
        "precision_at_k": found / k if k else None,
        "cost": unlearning_cost(setting, report, poisoned, data, callback),
        "ranking_forward_passes": 2 * len(data.retain_set),
    }


def add_retraining(rows: list[dict], cache: str) -> None:
    """Each row with ``discovered < 1`` gains the model retrained from scratch on D_r as it is (the identified
    samples dropped, the unidentified poison kept): its held-out accuracy and gap restored (models cached)."""
    setting = SETTINGS[SCENARIO]
    for row in rows:
        if row["discovered"] >= 1 or "retrain_without_identified" in row:
            continue
        seed, q = row["seed"], row["discovered"]
        path = os.path.join(cache, SCENARIO, f"seed{seed}", f"retain_discovered{q:g}.pt")
        model, seconds = train(setting, seed, "retain", path, discovered=q)
        accuracy = measure(model, make_datamodule(setting, seed))["heldout"]["accuracy"]
        p, r = row["heldout"]["poisoned"], row["heldout"]["retrained"]
        row["retrain_without_identified"] = {"heldout": accuracy, "gap_restored": (accuracy - p) / (r - p)}


def plot(rows: list[dict], path: str) -> None:
    """Gap restored against the share discovered: mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({row["discovered"] for row in rows})

    def mean(pick, q):
        values = [pick(row) for row in rows if row["discovered"] == q and pick(row) is not None]
        return 100 * sum(values) / len(values) if values else float("nan")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(shares, [mean(lambda r: r["gap_restored"], q) for q in shares], "o-", label="defaults (unlearning)")
    retrain = [q for q in shares if q < 1]
    ax.plot(
        retrain,
        [mean(lambda r: r.get("retrain_without_identified", {}).get("gap_restored"), q) for q in retrain],
        "s--",
        label="retrained without the identified samples",
    )
    ax.axhline(100, color="grey", linestyle=":", label="retrained on the corrected labels")
    ax.set_xscale("log")
    ax.set_xlabel("share of the poison discovered")
    ax.set_ylabel("held-out gap restored % (mean over seeds)")
    ax.set_title("mnist_targeted: part of the poison known")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrained(row: dict) -> str:
    other = row.get("retrain_without_identified")
    return "" if other is None else f"{100 * other['gap_restored']:.0f}"


def precision(row: dict) -> str:
    return "-" if row["precision_at_k"] is None else f"{row['precision_at_k']:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--discovered", type=float, nargs="+", default=[0.25])
    parser.add_argument("--cache", default="cache/benchmarks")
    parser.add_argument("--out", default="benchmarks/results/v0_3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--retrain-only",
        action="store_true",
        help="read <out>/discovery.json and add the models retrained without the identified samples",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = [list(os.getloadavg())]
    if args.retrain_only:
        with open(os.path.join(args.out, "discovery.json")) as f:
            earlier = json.load(f)
        rows, load = earlier["rows"], earlier["load_average"]
        command = f"{earlier['command']}; then {command_line('discovery.py', argv)}"
        add_retraining(rows, args.cache)
    else:
        rows = [run(seed, q, args.cache) for q in args.discovered for seed in args.seeds]
        load.append(list(os.getloadavg()))
        command = command_line("discovery.py", argv)
    lines = [
        "# Issue #25, first measurement: part of the poison known (mnist_targeted)",
        "",
        f"Command: `{command}`; {args.threads} torch thread(s); load average before "
        f"{load[0][0]:.2f}, after {load[1][0]:.2f}. The defaults unlearn from D_f = the known share; the rest of "
        "the poison stays in D_r. Precision at k = recall at k, k = the number of unidentified poisoned samples, "
        "ranking D_r by the rise of each sample's loss under its trained label (rank_suspects).",
        "",
        "| seed | discovered | known | unidentified | held-out after % | gap restored % | precision at k | "
        "unlearning units % | retrained without the identified: gap restored % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['seed']} | {row['discovered']:g} | {row['known']} | {row['unidentified']} | "
            f"{100 * row['heldout']['after']:.2f} | {100 * row['gap_restored']:.0f} | {precision(row)} | "
            f"{row['cost']['units_percent']:.2f} | {retrained(row)} |"
        )
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "discovery.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "discovery.json"), "w") as f:
        json.dump({"command": command, "load_average": load, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "discovery.png"))
    print(text)


if __name__ == "__main__":
    main()
