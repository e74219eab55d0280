"""CIFAR-10 with ResNet-18 as in the paper, on one GPU, in under 10 minutes (status: see benchmarks/README.md).

    mkdir -p cache/cifar10 && tar -xJf ../shared/datasets/cifar10-jpg.tar.xz -C cache/cifar10
    python benchmarks/cifar10_gpu.py            # writes benchmarks/results/cifar10_gpu.{md,json,_layers.png}

The "cifar10_gpu" setting of benchmarks/common.py, run by benchmarks/reproduce.py: every set lives on the GPU and is
batched there (PoisonedLabelDataModule(device="cuda")), training runs in bf16-mixed precision,
and curvature, gradients and updates run in float32 (the callback works outside autocast).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reproduce import main  # noqa: E402

if __name__ == "__main__":
    main(["--setting", "cifar10_gpu", "--seeds", "0", *sys.argv[1:]])
