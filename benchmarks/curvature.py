"""Curvature cost as a ratio to one plain gradient pass over the same data, in the same process.

    pip install backpack-for-pytorch curvlinops-for-pytorch    # benchmark-only extras
    python benchmarks/curvature.py --model paper_cnn            # writes benchmarks/results/curvature_<model>.{md,json}
    python benchmarks/curvature.py --model resnet18 --samples 512 --threads 1
    python benchmarks/curvature.py --accuracy                   # float64 PaperCNN against method="exact"
    python benchmarks/curvature.py --model resnet18 --samples 64 --batch-size 64 --chunk-size 4 --threads 1 \
        --methods ggn mc_ggn_1 empirical_fisher --per-example --name resnet18_per_example   # the fallback's cost

Each method runs in a fresh subprocess, which first times one gradient pass (the unit) and then
the method, and reports its peak resident memory. Accuracy is the relative L2 error of the whole
diagonal against our `ggn` (equal to the exact Hessian diagonal for these ReLU/max-pool/eval-BN
networks, which tests/test_curvature.py checks against torch.autograd.functional.hessian);
``--accuracy`` measures every method against ``method="exact"`` on PaperCNN in float64 instead.
``--per-example`` adds, after each of our per-example methods (``ggn``, ``mc_ggn_*``,
``empirical_fisher``), the same method forced onto the per-example path (vector-Jacobian products
under ``torch.func.vmap``), which is where models the forward-hook path cannot serve fall back
(tied weights, time-major activations, parametrized weights, other layer types): its cost beside
the fast path's. ``ggn_vmap`` is the same as ``ggn_per_example``.
ResNet-18 reads real CIFAR-10 training images from ``cache/cifar10`` when that copy exists.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = [
    "ggn",
    "ggn_vmap",
    "mc_ggn_1",
    "hutchinson_1",
    "empirical_fisher",
    "backpack_diag_ggn_exact",
    "backpack_diag_ggn_mc",
    "backpack_diag_hessian",
    "curvlinops_hutchinson_1",
]


def data_and_model(name: str, samples: int, batch_size: int):
    torch.manual_seed(0)
    if name == "paper_cnn":
        from torchvision.datasets import MNIST

        from lightning_sa_unlearn.models import PaperCNN

        mnist = MNIST(str(ROOT.parent / "shared" / "datasets"), train=True)
        x = ((mnist.data[:samples].float() / 255 - 0.1307) / 0.3081).unsqueeze(1)
        y = mnist.targets[:samples]
        model = PaperCNN().net
    else:
        from lightning_sa_unlearn.models import CifarResNet18

        x, y = cifar_images(samples)
        model = CifarResNet18().net
    model.eval()
    return model, [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, samples, batch_size)]


def cifar_images(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` random CIFAR-10 training images (normalized), or random tensors without the JPEG copy."""
    folder = ROOT / "cache" / "cifar10" / "train"
    if not folder.is_dir():
        print(f"no {folder}: random images (the cost does not depend on the pixels)", file=sys.stderr)
        return torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,))
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    dataset = ImageFolder(str(folder))
    chosen = torch.randperm(len(dataset.samples), generator=torch.Generator().manual_seed(0))[:samples]
    images = torch.stack([pil_to_tensor(dataset.loader(dataset.samples[i][0]).convert("RGB")) for i in chosen])
    x = images.float() / 255
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x, torch.tensor([dataset.targets[i] for i in chosen])


def gradient_pass(model, batches) -> None:
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()


PER_EXAMPLE = ("ggn", "mc_ggn_1", "empirical_fisher")
"""Our methods that have a forward-hook path and a per-example (fallback) path."""


def run_method(method: str, model: nn.Module, batches, chunk_size: int = 32) -> dict[str, torch.Tensor]:
    from lightning_sa_unlearn.curvature import hessian_diagonal

    ours = dict(chunk_size=chunk_size)
    if method == "ggn_vmap" or method.endswith("_per_example"):
        import lightning_sa_unlearn.curvature.ggn_fast as fast

        fast.supports = lambda model: False  # force the per-example vmap path
        method = method.removesuffix("_per_example").replace("ggn_vmap", "ggn")
    if method == "exact":
        return hessian_diagonal(model, batches, method="exact", **ours)
    if method == "ggn":
        return hessian_diagonal(model, batches, method="ggn", **ours)
    if method == "mc_ggn_1":
        return hessian_diagonal(model, batches, method="mc_ggn", num_samples=1, **ours)
    if method == "hutchinson_1":
        return hessian_diagonal(model, batches, method="hutchinson", num_probes=1, **ours)
    if method == "empirical_fisher":
        return hessian_diagonal(model, batches, method="empirical_fisher", **ours)
    if method.startswith("backpack"):
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

        extension, attribute = {
            "backpack_diag_ggn_exact": (DiagGGNExact, "diag_ggn_exact"),
            "backpack_diag_ggn_mc": (DiagGGNMC, "diag_ggn_mc"),
            "backpack_diag_hessian": (DiagHessian, "diag_h"),
        }[method]
        model = extend(model, use_converter=not isinstance(model, nn.Sequential))
        loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
        total, count = {}, 0
        for x, y in batches:
            model.zero_grad()
            with backpack(extension()):
                loss_fn(model(x), y).backward()
            for name, p in model.named_parameters():
                total[name] = total.get(name, 0) + getattr(p, attribute).detach()
            count += len(y)
        return {name: value / count for name, value in total.items()}
    if method == "curvlinops_hutchinson_1":
        from curvlinops import HessianLinearOperator, hutchinson_diag

        params = [p for p in model.parameters() if p.requires_grad]
        operator = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
        flat = hutchinson_diag(operator, num_matvecs=1)
        out, start = {}, 0
        for name, p in model.named_parameters():
            out[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out
    raise ValueError(method)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    model, batches = data_and_model(args.model, args.samples, args.batch_size)
    if args.float64:
        model = model.double()
        batches = [(x.double(), y) for x, y in batches]
    gradient_pass(model, batches[:1])  # warm-up
    start = time.perf_counter()
    gradient_pass(model, batches)
    unit = time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    diag = run_method(args.child, model, batches, args.chunk_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flat = torch.cat([d.detach().reshape(-1).double() for d in diag.values()])
    torch.save(flat, args.out_tensor)
    print(
        json.dumps(
            {
                "method": args.child,
                "seconds": seconds,
                "gradient_pass_seconds": unit,
                "ratio": seconds / unit,
                "peak_rss_mb": peak / 1024,
                "rss_before_mb": before / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["paper_cnn", "resnet18"], default="paper_cnn")
    parser.add_argument("--samples", type=int, default=None, help="default: 10,000 (PaperCNN) or 2,000 (ResNet-18)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: {METHODS}")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per method")
    parser.add_argument("--chunk-size", type=int, default=32, help="chunk_size of our methods (examples at once)")
    parser.add_argument(
        "--per-example",
        action="store_true",
        help=f"after each of {list(PER_EXAMPLE)}, run it again forced onto the per-example (fallback) path",
    )
    parser.add_argument("--name", help="results file stem after curvature_ (default: the model, or accuracy_...)")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="PaperCNN in float64 on --samples (default 256) images; errors against method='exact'",
    )
    parser.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out-tensor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accuracy:
        args.model, args.float64 = "paper_cnn", True
        args.samples = args.samples or 256
    args.methods = args.methods or (["exact", *METHODS] if args.accuracy else METHODS)
    if args.per_example and not args.child:
        args.methods = [
            m for method in args.methods for m in [method] + [f"{method}_per_example"] * (method in PER_EXAMPLE)
        ]
    args.samples = args.samples or (10_000 if args.model == "paper_cnn" else 2_000)
    name = args.name or ("accuracy_paper_cnn_float64" if args.accuracy else args.model)
    if args.child:
        return child(args)
    load_before = machine_load()
    results, diagonals = [], {}
    folder = ROOT / "outputs" / "curvature"
    folder.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        tensor = folder / f"{name}_{method}.pt"
        command = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--samples",
            str(args.samples),
            "--batch-size",
            str(args.batch_size),
            "--child",
            method,
            "--out-tensor",
            str(tensor),
            "--threads",
            str(args.threads),
            "--chunk-size",
            str(args.chunk_size),
            *(["--float64"] if args.float64 else []),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"method": method, "error": done.stderr.strip().splitlines()[-1]})
            print(method, "failed:", results[-1]["error"], flush=True)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        diagonals[method] = torch.load(tensor)
        print(results[-1], flush=True)
    reference_name = "exact" if args.accuracy else "ggn"
    reference = diagonals.get(reference_name)
    for row in results:
        if reference is not None and row["method"] in diagonals:
            error = float((diagonals[row["method"]] - reference).norm() / reference.norm())
            row[f"relative_error_vs_{reference_name}"] = error
    out = ROOT / "benchmarks" / "results"
    (out / f"curvature_{name}.json").write_text(json.dumps(results, indent=2))
    precision = "float64" if args.float64 else "float32"
    lines = [
        f"# Curvature cost on {args.model} ({precision}), {args.samples:,} samples, batch {args.batch_size}",
        "",
        f"Command: `python benchmarks/curvature.py {' '.join(sys.argv[1:])}` ({os.cpu_count()} CPU cores, "
        f"{args.threads} threads per method, torch {torch.__version__}).",
        "",
        f"Machine load (`uptime`) before the run: {load_before}; after it: {machine_load()}.",
        "",
        f"| method | seconds | gradient passes | peak RSS MB | rel. error vs {reference_name} |",
        "|---|---|---|---|---|",
    ]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} | | | |")
            continue
        error = row.get(f"relative_error_vs_{reference_name}")
        lines.append(
            f"| {row['method']} | {row['seconds']:.2f} | {row['ratio']:.1f} | {row['peak_rss_mb']:.0f} | "
            f"{'' if error is None else f'{error:.1e}'} |"
        )
    (out / f"curvature_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def machine_load() -> str:
    """The load averages that ``uptime`` prints: other processes on the cores slow every method alike."""
    done = subprocess.run(["uptime"], capture_output=True, text=True)
    return done.stdout.strip().split("load average:")[-1].strip() or "unknown"


if __name__ == "__main__":
    main()
