"""Issue #25: unlearning when only part of the poison is known, finding the rest, and unlearning again.

    python benchmarks/discovery.py --setting mnist_targeted --seeds 0 1 2 3 4 --discovered 0.05 0.1 0.25 0.5 1
    python benchmarks/discovery.py --setting cifar10_cpu --seeds 0 1 2 --discovered 0.25 0.5

For each seed and discovered share q, every method unlearns the cached poisoned model (reproduce.py's: the
poisoned samples do not depend on q) from a datamodule whose D_f is a seeded share q of the poison; the rest
stays in D_r with its wrong labels. Then rank_suspects ranks D_r by the rise of each sample's loss under its
trained label between the poisoned model and the defaults' result: the top k (k = the number of unidentified
poisoned samples) is scored against the truth, precision = recall at that k. The second round unlearns the
poisoned model again with the defaults, D_f = the known poison plus the flagged samples (the trained label's
probability at least halved), their D̃_f labels the unlearned model's most probable other class
(ExtendedForgetData). Gap
restored against the same retrained model as reproduce.py's; units as unlearning_cost counts them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SETTINGS,
    command_line,
    default_parts,
    lr_grid,
    make_callback,
    make_datamodule,
    make_model,
    measure,
    train,
    unlearn_or_refusal,
    unlearning_cost,
)
from discovery_tables import plot, table, targets, verdicts  # noqa: E402

from lightning_sa_unlearn import AllLayers, FineTune  # noqa: E402
from lightning_sa_unlearn.discovery import ExtendedForgetData, rank_suspects, shared_split  # noqa: E402
from lightning_sa_unlearn.passes import above_share, stage_units  # noqa: E402

METHODS = {
    "defaults (step then fine-tune, last layer)": lambda s: dict(curvature=None, **default_parts()),
    # the callback's defaults until version 0.2 and the paper's method: its curvature, the flattest layer, τ·∇
    "closed form, flattest layer (0.2 defaults)": lambda s: {},
    "fine-tune all layers on D_r, lr on validation": lambda s: dict(
        curvature=None,
        selection=AllLayers(),
        update=FineTune(epochs=1, lr=lr_grid(s), include_corrected=False, best_epoch=True),
    ),
}
DEFAULTS = next(iter(METHODS))


def unlearned(setting_name: str, seed: int, parts: dict, fitted: Any, data: Any, data_for_cost: Any) -> tuple:
    """A copy of ``fitted`` unlearned with ``parts`` on ``data``: ``(model, {held-out accuracy, units %})``."""
    setting = SETTINGS[setting_name]
    model = make_model(setting)
    model.load_state_dict(fitted.state_dict())
    callback = make_callback(setting, seed, **parts)
    report, refusal = unlearn_or_refusal(callback, model, data)
    accuracy = measure(model, data_for_cost)["heldout"]["accuracy"]
    units = None if report is None else unlearning_cost(setting, report, fitted, data_for_cost, callback)
    return model, {"heldout": accuracy, "units_percent": units and units["units_percent"], **refusal}


def ranking_units(suspects: Any, model: Any, before: Any, data: Any) -> float:
    """Units of :func:`rank_suspects`' passes; those above the shared layers at their timed share of a pass."""
    x = next(iter(data.retain_dataloader()))[0]
    split = shared_split(before, model, x) if "forward_above" in suspects.passes else None  # before's own modules
    share = None if split is None else above_share(before, split[0], split[1], x)
    return stage_units(suspects.passes, above_share=share)


def run(setting_name: str, seed: int, discovered: float, cache: str) -> dict:
    setting = SETTINGS[setting_name]
    folder = os.path.join(cache, setting_name, f"seed{seed}")
    poisoned, _ = train(setting, seed, "poisoned", os.path.join(folder, "poisoned.pt"))
    retrained, _ = train(setting, seed, "corrected", os.path.join(folder, "retrained.pt"))
    data = make_datamodule(setting, seed, discovered=discovered)
    p, r = (measure(x, data)["heldout"]["accuracy"] for x in (poisoned, retrained))
    gap = lambda accuracy: (accuracy - p) / (r - p)  # noqa: E731
    training_units = setting.epochs * len(data.train_set)
    row: dict[str, Any] = {
        "seed": seed,
        "discovered": discovered,
        "known": len(data.forget_set),
        "unidentified": len(data.unidentified_positions),
        "heldout": {"poisoned": p, "retrained": r},
        "methods": {},
    }
    for name, parts in METHODS.items():
        model, result = unlearned(setting_name, seed, parts(setting), poisoned, data, data)
        row["methods"][name] = {**result, "gap_restored": gap(result["heldout"])}
        if name == DEFAULTS:
            first_round = model
    if row["unidentified"] == 0:
        return row
    # positions in D_r of the unidentified poison: D_r is train_set without D_f, in train_set order
    in_retain = torch.ones(len(data.train_set), dtype=torch.bool)
    in_retain[data.poisoned_positions] = False
    in_retain[data.unidentified_positions] = True
    truth = set((torch.cumsum(in_retain.long(), 0) - 1)[data.unidentified_positions].tolist())
    suspects = rank_suspects(first_round, data.retain_dataloader(), before=poisoned)
    candidates = set(suspects.candidates().tolist())
    rank_units = ranking_units(suspects, first_round, poisoned, data)
    row["ranking"] = {
        "precision_at_k": len(truth & set(suspects.top(len(truth)).tolist())) / len(truth),
        "candidates": len(candidates),
        "candidate_precision": len(truth & candidates) / max(1, len(candidates)),
        "candidate_recall": len(truth & candidates) / len(truth),
        "passes": suspects.passes,
        "units_percent": 100 * rank_units / training_units,
    }
    extended = ExtendedForgetData(data, suspects.candidates(), suspects.candidate_labels())
    _, result = unlearned(setting_name, seed, METHODS[DEFAULTS](setting), poisoned, extended, data)
    row["second_round"] = {**result, "gap_restored": gap(result["heldout"])}
    spent = [row["methods"][DEFAULTS]["units_percent"], row["ranking"]["units_percent"], result["units_percent"]]
    row["round_units_percent"] = None if None in spent else sum(spent)
    return row


def add_retraining(setting_name: str, rows: list[dict], cache: str, train_missing: bool) -> None:
    """Each row with ``discovered < 1`` gains the model retrained from scratch on D_r as it is (the identified
    samples dropped, the unidentified poison kept): its held-out accuracy and gap restored. Models come from the
    cache; ``train_missing`` trains those it lacks."""
    setting = SETTINGS[setting_name]
    for row in rows:
        seed, q = row["seed"], row["discovered"]
        path = os.path.join(cache, setting_name, f"seed{seed}", f"retain_discovered{q:g}.pt")
        if q >= 1 or not (train_missing or os.path.exists(path)):
            continue
        model, _ = train(setting, seed, "retain", path, discovered=q)
        accuracy = measure(model, make_datamodule(setting, seed))["heldout"]["accuracy"]
        p, r = row["heldout"]["poisoned"], row["heldout"]["retrained"]
        row["retrain_without_identified"] = {"heldout": accuracy, "gap_restored": (accuracy - p) / (r - p)}


def write(out: str, results: dict) -> str:
    """``discovery[_<setting>].md``, ``.json`` and ``.png`` under ``out`` from ``results``; returns the table."""
    setting = results["setting"]
    name = "discovery" if setting == "mnist_targeted" else f"discovery_{setting}"
    results["targets"] = targets(results["rows"]) if setting == "mnist_targeted" else None
    text = table(setting, results["rows"], results["command"], results["threads"], results["load_average"])
    text += verdicts(results["targets"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(setting, results["rows"], os.path.join(out, f"{name}.png"))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="mnist_targeted", choices=["mnist_targeted", "cifar10_cpu"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--discovered", type=float, nargs="+", default=[0.25])
    parser.add_argument("--cache", default="cache/benchmarks")
    parser.add_argument("--out", default="benchmarks/results/v0_3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--retrain", action="store_true", help="train the retrained-without-identified models missing")
    parser.add_argument(
        "--retrain-only",
        metavar="PATH",
        help="read a results file and add the models retrained without the identified samples (trains the missing)",
    )
    parser.add_argument("--from-json", metavar="PATH", help="run nothing: rebuild the table and plot of a results file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json or args.retrain_only:
        with open(args.from_json or args.retrain_only) as f:
            results = json.load(f)
        if args.retrain_only:
            results["command"] += f"; then {command_line('discovery.py', argv)}"
            add_retraining(results["setting"], results["rows"], args.cache, train_missing=True)
    else:
        load = [list(os.getloadavg())]
        rows = [run(args.setting, seed, q, args.cache) for q in args.discovered for seed in args.seeds]
        add_retraining(args.setting, rows, args.cache, train_missing=args.retrain)
        load.append(list(os.getloadavg()))
        results = {
            "setting": args.setting,
            "command": command_line("discovery.py", argv),
            "threads": args.threads,
            "load_average": load,
            "rows": rows,
        }
    print(write(args.out, results))


if __name__ == "__main__":
    main()
