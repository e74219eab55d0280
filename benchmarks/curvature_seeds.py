"""How much curvature data each method needs to pick the same layer every time (issue: defaults from measurements).

    python benchmarks/curvature_seeds.py      # writes benchmarks/results/curvature_seeds.{md,json}

For each poisoned model of the mnist_targeted benchmark (seeds 0-4; trained by
``python -m lightning_sa_unlearn.benchmarks --setting mnist_targeted`` if not cached) the
reference is the exact ``ggn`` on all training images. Every configuration then measures the
layer sharpness on a random subset drawn with the model's seed, and we count how often its
flattest layer is the reference's, and how far that layer leads the runner-up in standard errors.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from lightning_sa_unlearn.benchmarks import SETTINGS, make_datamodule, train
from lightning_sa_unlearn.confidence import SharpnessStatistics, selection_margin
from lightning_sa_unlearn.curvature import hessian_diagonal_sum
from lightning_sa_unlearn.data import shard
from lightning_sa_unlearn.selection import select_layers

CONFIGS = {
    "ggn, all samples": dict(method="ggn", samples=None),
    "ggn, 1,000": dict(method="ggn", samples=1000),
    "ggn, 5,000": dict(method="ggn", samples=5000),
    "ggn, 10,000": dict(method="ggn", samples=10_000),
    "mc_ggn 1 sample, 1,000": dict(method="mc_ggn", samples=1000),
    "mc_ggn 1 sample, 10,000": dict(method="mc_ggn", samples=10_000),
    "mc_ggn 1 sample, all samples": dict(method="mc_ggn", samples=None),
    "hutchinson 1 probe, 10,000": dict(method="hutchinson", samples=10_000, num_probes=1),
    "hutchinson 10 probes, 10,000": dict(method="hutchinson", samples=10_000, num_probes=10),
}


def measure(model, loader, seed: int, method: str, samples: int | None, num_probes: int = 1) -> dict:
    batches = shard(loader, 0, 1, max_samples=samples, seed=seed)
    statistics_ = SharpnessStatistics(model)
    start = time.perf_counter()
    hessian_diagonal_sum(
        model,
        batches,
        method=method,
        num_probes=num_probes,
        generator=torch.Generator().manual_seed(seed),
        on_batch=statistics_.update,
    )
    seconds = time.perf_counter() - start
    sharpness = statistics_.means()
    picked = select_layers(sharpness, "flattest")
    margin = selection_margin(sharpness, statistics_, picked, "flattest")
    return {
        "picked": picked[0],
        "runner_up": margin["runner_up"],
        "lead_in_standard_errors": margin["lead_in_standard_errors"],
        "sharpness": sharpness,
        "seconds": seconds,
    }


def main(seeds=(0, 1, 2, 3, 4), cache: str = "cache/benchmarks", out: str = "benchmarks/results") -> None:
    setting = SETTINGS["mnist_targeted"]
    rows: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for seed in seeds:
        model, _ = train(setting, seed, "poisoned", os.path.join(cache, "mnist_targeted", f"seed{seed}", "poisoned.pt"))
        loader = make_datamodule(setting, seed).train_dataloader()
        for name, config in CONFIGS.items():
            result = measure(model, loader, seed, config["method"], config["samples"], config.get("num_probes", 1))
            rows[name].append(result)
            print(f"seed {seed} {name}: {result['picked']} ({result['lead_in_standard_errors']:.1f} SE)", flush=True)
    reference = [r["picked"] for r in rows["ggn, all samples"]]
    lines = [
        "# Curvature data needed for a stable layer choice (MNIST, PaperCNN, poisoned mnist_targeted models)",
        "",
        "Command: `python benchmarks/curvature_seeds.py`",
        "",
        f"Reference: the flattest layer by exact `ggn` on all training images, per seed: {', '.join(reference)}. "
        f"Seeds {list(seeds)} (one poisoned model and one random subset per seed). Lead: the flattest layer's "
        "margin over the runner-up in standard errors over batches (batch 128), median over seeds. "
        f"{torch.get_num_threads()} torch threads.",
        "",
        "| configuration | same layer as the reference | median lead (standard errors) | seconds (mean) |",
        "|---|---|---|---|",
    ]
    for name, results in rows.items():
        same = sum(r["picked"] == ref for r, ref in zip(results, reference))
        lead = statistics.median(r["lead_in_standard_errors"] for r in results)
        seconds = statistics.fmean(r["seconds"] for r in results)
        lines.append(f"| {name} | {same} of {len(results)} | {lead:.1f} | {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "curvature_seeds.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "curvature_seeds.json"), "w") as f:
        json.dump({"command": "python benchmarks/curvature_seeds.py", "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main(*([tuple(int(s) for s in sys.argv[1:])] if len(sys.argv) > 1 else []))
