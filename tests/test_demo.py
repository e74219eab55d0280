"""The `make demo` pipeline on a small real MNIST subset from ../shared/datasets."""

import json
import pathlib
import re

import pytest
import torch
import torchvision

from lightning_sa_unlearn import PoisonedLabelDataModule, demo

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAS_MNIST = (DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST is not at {DATA} (the shared offline copy)")
def test_demo_runs_on_a_real_mnist_subset(tmp_path, capsys):
    demo.main(
        [
            "--data",
            str(DATA),
            "--num-train",
            "3000",
            "--num-poisoned",
            "150",
            "--epochs",
            "2",
            "--curvature-samples",
            "600",
            "--runs",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "| poisoned" in out and "| after unlearning" in out and "<- selected" in out
    assert re.search(
        r"^unlearning: [0-9.]+ s \([0-9.]+% of training\), median of 2 runs; [0-9,]+ units \([0-9.]+% of training\)",
        out,
        re.MULTILINE,
    )
    stages = re.search(r"^  units per stage: (.*)$", out, re.MULTILINE).group(1)
    assert [part.split()[0] for part in stages.split(", ")] == [
        "forget_gradient", "curvature", "selection", "update", "harm_guard"
    ]  # fmt: skip
    assert re.search(r"^reporting \(held-out metrics before and after\): [0-9.]+ s", out, re.MULTILINE)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["curvature_samples"] == 600
    assert list(report["layer_sharpness"]) == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
    assert 0.5 < report["heldout_after"]["accuracy"] <= 1.0
    assert (tmp_path / "sharpness.png").exists()


@pytest.mark.skipif(not HAS_MNIST, reason=f"MNIST is not at {DATA} (the shared offline copy)")
def test_mnist_split_follows_the_paper():
    dm = PoisonedLabelDataModule(dataset="mnist", root=str(DATA), num_poisoned=2500)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50_000, 10_000, 10_000)
    assert (dm.corrected_set.tensors[1] == 9).all() and len(dm.forget_set) == 2500
    original = torchvision.datasets.MNIST(str(DATA), train=True).targets
    assert torch.equal(dm.val_set.tensors[1], original[dm.val_indices])
    assert torch.equal(dm.corrected_set.tensors[1], original[dm.poisoned_indices])
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
