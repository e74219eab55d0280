"""CIFAR-10 with ResNet-18 as in the paper, on one GPU, in under 10 minutes (status: see the README).

    mkdir -p cache/cifar10 && tar -xJf ../shared/datasets/cifar10-jpg.tar.xz -C cache/cifar10
    python benchmarks/cifar10_gpu.py            # writes benchmarks/results/cifar10_gpu.{md,json,_layers.png}

The "cifar10_gpu" setting of lightning_sa_unlearn.benchmarks: every set lives on the GPU and is
batched there (PoisonedLabelDataModule(device="cuda")), training runs in bf16-mixed precision,
and curvature, gradients and updates run in float32 (the callback works outside autocast).
"""

import sys

from lightning_sa_unlearn.benchmarks import main

if __name__ == "__main__":
    main(["--setting", "cifar10_gpu", "--seeds", "0", *sys.argv[1:]])
