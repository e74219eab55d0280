"""How much curvature data each method needs to pick the same layer every time (issue: defaults from measurements).

    python benchmarks/curvature_seeds.py      # writes benchmarks/results/curvature_seeds.{md,json}
    python benchmarks/curvature_seeds.py --setting cifar10_cpu --seeds 0 1 2   # ResNet-20, seed-0 model

For each poisoned model of the mnist_targeted benchmark (seeds 0-4; trained by
``python benchmarks/reproduce.py --setting mnist_targeted`` if not cached) the
reference is the exact ``ggn`` on all training images. Every configuration then measures the
layer sharpness on a random subset drawn with the model's seed, and we count how often its
flattest layer is the reference's, and how far that layer leads the runner-up in standard errors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SETTINGS, make_datamodule, train  # noqa: E402

from lightning_sa_unlearn.curvature import SharpnessStatistics, hessian_diagonal_sum, selection_margin  # noqa: E402
from lightning_sa_unlearn.data import shard  # noqa: E402
from lightning_sa_unlearn.selection import select_layers  # noqa: E402

# ResNet-20 on CIFAR (the poisoned model of cifar10_cpu, seed 0; subsets drawn with each seed):
# the reference is ggn on 4,000 images, since all 20,000 take 10 minutes on one core.
RESNET_REFERENCE = "ggn, 4,000"
RESNET_CONFIGS = {
    "ggn, 4,000": dict(method="ggn", samples=4000),
    "ggn, 1,000": dict(method="ggn", samples=1000),
    "mc_ggn 1 sample, 1,000": dict(method="mc_ggn", samples=1000),
    "mc_ggn 1 sample, 4,000": dict(method="mc_ggn", samples=4000),
}
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


def main(
    seeds=(0, 1, 2, 3, 4), cache: str = "cache/benchmarks", out: str = "benchmarks/results", name="mnist_targeted"
) -> None:
    setting = SETTINGS[name]
    resnet = name != "mnist_targeted"
    configs = RESNET_CONFIGS if resnet else CONFIGS
    reference_name = RESNET_REFERENCE if resnet else "ggn, all samples"
    rows: dict[str, list[dict]] = {config: [] for config in configs}
    for seed in seeds:
        model_seed = 0 if resnet else seed  # one trained ResNet; its subsets vary with the seed
        model, _ = train(setting, model_seed, "poisoned", os.path.join(cache, name, f"seed{model_seed}", "poisoned.pt"))
        loader = make_datamodule(setting, model_seed).train_dataloader()
        for config_name, config in configs.items():
            result = measure(model, loader, seed, config["method"], config["samples"], config.get("num_probes", 1))
            rows[config_name].append(result)
            lead = result["lead_in_standard_errors"]
            print(f"seed {seed} {config_name}: {result['picked']} ({lead:.1f} SE)", flush=True)
    reference = [r["picked"] for r in rows[reference_name]]
    command = "python benchmarks/curvature_seeds.py" + (
        f" --setting {name} --seeds {' '.join(map(str, seeds))}" if resnet else ""
    )
    model_text = (
        "CIFAR-10, ResNet-20, the poisoned cifar10_cpu model"
        if resnet
        else "MNIST, PaperCNN, poisoned mnist_targeted models"
    )
    lines = [
        f"# Curvature data needed for a stable layer choice ({model_text})",
        "",
        f"Command: `{command}`",
        "",
        f"Reference: the flattest layer by exact `{reference_name}`, per seed: {', '.join(reference)}. "
        f"Seeds {list(seeds)} (a random subset per seed). Lead: the flattest layer's "
        "margin over the runner-up in standard errors over batches (batch 128), median over seeds. "
        f"{torch.get_num_threads()} torch threads.",
        "",
        "| configuration | same layer as the reference | median lead (standard errors) | seconds (mean) |",
        "|---|---|---|---|",
    ]
    for config_name, results in rows.items():
        same = sum(r["picked"] == ref for r, ref in zip(results, reference))
        lead = statistics.median(r["lead_in_standard_errors"] for r in results)
        seconds = statistics.fmean(r["seconds"] for r in results)
        lines.append(f"| {config_name} | {same} of {len(results)} | {lead:.1f} | {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    stem = f"curvature_seeds_{name}" if resnet else "curvature_seeds"
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="mnist_targeted", choices=["mnist_targeted", "cifar10_cpu"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    main(tuple(args.seeds), name=args.setting)
