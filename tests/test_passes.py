"""Sample passes per stage (the report's ``sample_passes``) against counts by hand, and their units."""

import pytest
import torch

from lightning_sa_unlearn import FineTune, Layers, SharpnessAwareUnlearning
from lightning_sa_unlearn.passes import count_samples, stage_units


def test_the_report_counts_each_stage_by_hand(tiny_model):
    model, datamodule = tiny_model  # 30 forget samples, 90 validation samples, batches of 32
    report = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), update="first_order", verbose=False).unlearn(
        model, datamodule
    )
    passes, validation, probe = report.sample_passes, 90, 32
    assert report.validation_samples == report.harm_guard["samples"] == validation
    # forget and corrected inputs are equal: one forward and backward gives both losses
    assert passes["forget_gradient"] == {"forward_backward": 30}
    # the guard: the frozen layers once (plus the split's check on one batch), stored; the layers above before and
    # after
    assert passes["harm_guard"] == {"forward": validation + probe, "forward_above": 2 * validation}
    # the step search reads the guard's store: τ = 0 and 6 golden points through the layers above only; the finite
    # check reads the search's value instead of a pass of its own
    assert passes["update"] == {"forward_above": 7 * validation}
    assert passes["evaluation"] == {"forward": 2 * (90 + 30 + 30)}  # test, forget, corrected; before and after
    assert passes["curvature_report"]["forward_backward"] >= report.curvature_samples


def test_cached_fine_tuning_counts_the_layers_above_per_epoch(tiny_model):
    model, datamodule = tiny_model
    update = FineTune(epochs=3)
    report = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), update=update, verbose=False).unlearn(
        model, datamodule
    )
    samples = 210 + 30  # the retain set and the forget inputs with corrected labels
    assert report.update_details["cached_below"] == "net.relu2"
    assert report.sample_passes["update"]["forward_backward_above"] == 3 * samples
    # the frozen layers once per sample, one batch for the split's check, the finite check on the forget set
    # (a fine-tune reads no validation data)
    assert report.sample_passes["update"]["forward"] == samples + 32 + 30


def test_units_of_counted_passes_by_hand():
    passes = {"forward_backward": 10, "forward": 30, "forward_above": 60, "forward_backward_above": 5}
    assert stage_units(passes, above_share=0.1) == pytest.approx(10 + 30 / 3 + 0.1 * 60 / 3 + 0.1 * 5)
    assert stage_units({"forward_backward": 99}, curvature_cost=1.5, samples=200) == 300
    with pytest.raises(ValueError, match="above_share"):
        stage_units(passes)


def test_counting_sees_kinds_and_skips_per_example_calls():
    seen = []
    layer = torch.nn.Linear(3, 2)
    count_samples(layer, lambda kind, n: seen.append((kind, n)), "_above")
    x = torch.randn(5, 3)
    layer(x)
    with torch.no_grad():
        layer(x)
    torch.func.vmap(layer)(x)  # per-example calls: the batch dimension is hidden
    assert seen == [("forward_backward_above", 5), ("forward_above", 5)]


def test_timing_leaves_the_priced_model_as_it_was():
    """The timed passes run in train mode: BatchNorm's running statistics must come back as they were."""
    from lightning_sa_unlearn import GGN
    from lightning_sa_unlearn.objective.stored_features import split_below
    from lightning_sa_unlearn.passes import above_share, curvature_cost, seconds_per_gradient_sample

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    ).train()
    batches = [(torch.randn(16, 4) + 3, torch.randint(0, 3, (16,))) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    below, above, _ = split_below(model, ["3.weight", "3.bias"], batches[0][0])
    assert seconds_per_gradient_sample(model, batches) > 0
    assert above_share(model, below, above, batches[0][0]) > 0
    assert curvature_cost(model, batches, GGN(), samples=32, repeats=2) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    assert all(p.grad is None for p in model.parameters())
