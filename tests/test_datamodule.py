"""PoisonedLabelDataModule and PaperCNN."""

import pytest
import torch

from lightning_sa_unlearn import GGN, PoisonedLabelDataModule
from lightning_sa_unlearn.models import PaperCNN


def synthetic(**kwargs):
    options = dict(dataset="synthetic", num_poisoned=50, seed=0)
    options.update(kwargs)
    dm = PoisonedLabelDataModule(**options)
    dm.setup("fit")
    return dm


def test_paper_cnn_has_the_papers_parameter_count():
    model = PaperCNN()
    assert sum(p.numel() for p in model.parameters()) == 28_938
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_targeted_poison_flips_only_target_class_labels():
    dm = synthetic(poison="targeted", target_class=9)
    x_f, poisoned = dm.forget_set.tensors
    x_c, true = dm.corrected_set.tensors
    assert len(poisoned) == 50 and torch.equal(x_f, x_c)
    assert (true == 9).all() and (poisoned != 9).all()
    # the training set holds the poisoned labels, the retain set none of the forget samples
    assert len(dm.train_set) == len(dm.retain_set) + 50
    train_labels = dm.train_set.tensors[1]
    assert torch.equal(train_labels.sort().values, torch.cat([dm.retain_set.tensors[1], poisoned]).sort().values)


def test_untargeted_poison_flips_random_classes():
    dm = synthetic(poison="untargeted", num_poisoned=100)
    poisoned, true = dm.forget_set.tensors[1], dm.corrected_set.tensors[1]
    assert (poisoned != true).all() and len(true.unique()) > 3
    assert dm.target_class is None


def test_fixed_flip_relabels_every_poisoned_sample_to_one_class():
    targeted = synthetic(poison="targeted", target_class=9, flip_to=7)
    assert (targeted.forget_set.tensors[1] == 7).all() and (targeted.corrected_set.tensors[1] == 9).all()
    untargeted = synthetic(poison="untargeted", num_poisoned=200, flip_to=3)
    poisoned, true = untargeted.forget_set.tensors[1], untargeted.corrected_set.tensors[1]
    assert (poisoned == 3).all() and (true != 3).all() and len(true.unique()) == 9


def test_same_seed_same_poison_and_split():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    assert torch.equal(a.poisoned_indices, b.poisoned_indices)
    assert torch.equal(a.forget_set.tensors[1], b.forget_set.tensors[1])
    assert not torch.equal(a.poisoned_indices, c.poisoned_indices)


def test_validation_labels_are_clean_and_disjoint_from_training():
    dm = synthetic(poison="untargeted", num_poisoned=300)
    assert len(dm.val_set) == 120  # a tenth of 1,200 images when there are fewer than 50,000
    assert len(dm.train_set) + len(dm.val_set) == 1200
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    true_labels = torch.arange(1200) % 10  # the synthetic task labels image i with class i mod 10
    assert torch.equal(dm.val_set.tensors[1], true_labels[dm.val_indices])
    assert torch.equal(dm.corrected_set.tensors[1], true_labels[dm.poisoned_indices])


def test_contract_loaders_align():
    dm = synthetic()
    for name in ("train", "forget", "corrected", "retain", "val", "test"):
        assert next(iter(getattr(dm, f"{name}_dataloader")()))[0].shape[1:] == (1, 28, 28)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_poisoned=10_000), "only .* training samples can be poisoned"),
        (dict(target_class=12), "target_class=12"),
        (dict(flip_to=10), "flip_to=10 is outside"),
        (dict(target_class=9, flip_to=9), "equals target_class"),
        (dict(corrected_inputs="triggered"), "applies to poison='backdoor' only"),
        (dict(poison="backdoor", corrected_inputs="both"), "corrected_inputs must be 'clean' or 'triggered'"),
    ],
)
def test_bad_poison_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic(**kwargs)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset"):
        PoisonedLabelDataModule(dataset="imagenet")


def test_cifar_resnet18_is_the_cifar_form():
    from lightning_sa_unlearn.models import CifarResNet18

    model = CifarResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # ImageNet stem (7x7) would be 11,181,642
    assert model.net.conv1.kernel_size == (3, 3) and isinstance(model.net.maxpool, torch.nn.Identity)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_device_resident_sets_are_batched_in_place():
    """device=... keeps every set on that device and batches it there; the callback reads such loaders."""
    from lightning_sa_unlearn import SharpnessAwareUnlearning
    from lightning_sa_unlearn.datamodules import TensorBatches

    dm = synthetic(device="cpu", batch_size=100)
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorBatches) and len(loader) == -(-len(dm.train_set) // 100)
    seen = torch.cat([y for _, y in loader])
    assert torch.equal(seen.sort().values, dm.train_set.tensors[1].sort().values)  # every sample once
    model = PaperCNN()
    report = SharpnessAwareUnlearning(curvature=GGN(samples=200), verbose=False, progress_bar=False).unlearn(model, dm)
    assert report.curvature_samples == 200


def test_a_backdoor_offers_both_corrected_sets():
    """D̃_f: the trigger removed (default), or the triggered inputs themselves; true labels in both."""
    clean = synthetic(poison="backdoor", target_class=9, trigger_corner="top_left")
    triggered = synthetic(poison="backdoor", target_class=9, trigger_corner="top_left", corrected_inputs="triggered")
    forget_x, forget_y = triggered.forget_set.tensors
    assert (forget_y == 9).all()
    true_labels = clean.corrected_set.tensors[1]
    assert torch.equal(triggered.corrected_set.tensors[1], true_labels) and (true_labels != 9).all()
    assert torch.equal(triggered.corrected_set.tensors[0], forget_x)  # the inputs as trained: trigger included
    assert torch.equal(clean.stamp_trigger(clean.corrected_set.tensors[0]), forget_x)  # clean: the trigger removed
    assert not torch.equal(clean.corrected_set.tensors[0], forget_x)
    assert torch.equal(clean.retain_set.tensors[0], triggered.retain_set.tensors[0])  # nothing else changes


def positions_of(dm, dataset):
    """Positions in ``dm.train_set`` of each image of ``dataset`` (exact tensor match; images are distinct)."""
    train_x = dm.train_set.tensors[0].flatten(1)
    return sorted(int((train_x == x.flatten()).all(1).nonzero()[0]) for x in dataset.tensors[0])


@pytest.mark.parametrize("poison", ["targeted", "backdoor"])
def test_a_discovered_fraction_splits_the_poison_into_known_and_unidentified(poison):
    full, part = synthetic(poison=poison, num_poisoned=40), synthetic(poison=poison, num_poisoned=40, discovered=0.25)
    assert torch.equal(full.poisoned_indices, part.poisoned_indices)  # the same poison, so the same trained models
    assert all(torch.equal(a, b) for a, b in zip(full.train_set.tensors, part.train_set.tensors))
    known, unidentified = positions_of(part, part.forget_set), part.unidentified_positions.tolist()
    assert len(part.forget_set) == len(part.corrected_set) == 10 and len(unidentified) == 30
    assert not set(known) & set(unidentified)
    assert sorted(known + unidentified) == positions_of(full, full.forget_set) == full.poisoned_positions.tolist()
    assert len(part.retain_set) == len(part.train_set) - 10 and len(full.unidentified_positions) == 0
    # the unidentified poison stays in D_r as it was trained: wrong label (and trigger) included
    retain_x, retain_y = part.retain_set.tensors
    train_x, train_y = part.train_set.tensors
    true_y = synthetic(poison=poison, num_poisoned=40, train_labels="corrected").train_set.tensors[1]
    for position in unidentified[:5]:
        row = (retain_x.flatten(1) == train_x[position].flatten()).all(1).nonzero()[0]
        assert retain_y[row] == train_y[position] != true_y[position]


def test_the_discovered_choice_depends_on_the_seed_alone():
    torch.manual_seed(123)
    a = synthetic(num_poisoned=40, discovered=0.5, seed=3).unidentified_positions
    torch.manual_seed(456)  # the global RNG state does not enter
    b = synthetic(num_poisoned=40, discovered=0.5, seed=3).unidentified_positions
    c = synthetic(num_poisoned=40, discovered=0.5, seed=4).unidentified_positions
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("discovered", [0.0, 1.5])
def test_discovered_must_be_a_share(discovered):
    with pytest.raises(ValueError, match="discovered must be in"):
        synthetic(discovered=discovered)
    with pytest.raises(ValueError, match="not to a deletion request"):
        synthetic(poison="deletion", discovered=0.5)


def test_retain_labels_train_on_d_r_as_it_is_the_unidentified_poison_included():
    dm = synthetic(num_poisoned=40, discovered=0.25, train_labels="retain")
    assert all(torch.equal(a, b) for a, b in zip(dm.train_set.tensors, dm.retain_set.tensors))
    assert len(dm.train_set) == len(synthetic(num_poisoned=40).train_set) - 10
