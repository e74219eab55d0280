"""layer_sharpness and the selection rules, against hand-computed values."""

import pytest
import torch
from torch import nn

from lightning_sa_unlearn import layer_sharpness, select_layers
from lightning_sa_unlearn.selection import trainable_layers


def model():
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))


def test_layer_sharpness_is_mean_over_weight_and_bias():
    net = model()
    diag = {name: torch.full_like(p, float(i + 1)) for i, (name, p) in enumerate(net.named_parameters())}
    # 0.weight (6 entries of 1), 0.bias (3 of 2) -> (6 + 6) / 9
    # 1.weight (3 of 3), 1.bias (3 of 4) -> 21 / 6; 3.weight (3 of 5), 3.bias (1 of 6) -> 21 / 4
    sharpness = layer_sharpness(net, diag)
    assert list(sharpness) == ["0", "1", "3"]  # registration order, ReLU owns nothing
    assert sharpness["0"] == pytest.approx(12 / 9)
    assert sharpness["1"] == pytest.approx(21 / 6)
    assert sharpness["3"] == pytest.approx(21 / 4)


def test_frozen_parameters_are_left_out():
    net = model()
    net[0].bias.requires_grad_(False)
    net[1].requires_grad_(False)
    assert trainable_layers(net) == {"0": ["0.weight"], "3": ["3.weight", "3.bias"]}


SHARPNESS = {"conv1": 0.5, "conv2": 0.1, "fc1": 0.01, "fc2": 0.3}


@pytest.mark.parametrize(
    "rule, num_layers, expected",
    [
        ("flattest", 1, ["fc1"]),
        ("flattest", 2, ["fc1", "conv2"]),
        ("sharpest", 1, ["conv1"]),
        ("sharpest", 2, ["conv1", "fc2"]),
        ("last", 1, ["fc2"]),
        ("last", 2, ["fc1", "fc2"]),
        ("all", 1, ["conv1", "conv2", "fc1", "fc2"]),
        (["conv2", "fc2"], 1, ["conv2", "fc2"]),
    ],
)
def test_rules(rule, num_layers, expected):
    assert select_layers(SHARPNESS, rule, num_layers) == expected


def test_bad_selections_say_what_to_do():
    with pytest.raises(ValueError, match=r"not a module that owns trainable parameters \(did you mean 'conv2' or"):
        select_layers(SHARPNESS, ["conv3"])
    with pytest.raises(ValueError, match=r"\['fc', 'head'\], which are not modules .* \(did you mean 'model.fc'\?\)"):
        select_layers({"model.conv1": 1.0, "model.fc": 2.0}, ["fc", "head"])
    with pytest.raises(ValueError, match="num_layers=5.*4 trainable layers"):
        select_layers(SHARPNESS, "flattest", 5)
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_layers(SHARPNESS, "random")


def test_tied_weights_belong_to_the_first_module():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    net[2].weight = net[0].weight
    assert trainable_layers(net) == {"0": ["0.weight", "0.bias"], "2": ["2.bias"]}
    diag = {name: torch.ones_like(p) for name, p in net.named_parameters()}
    assert layer_sharpness(net, diag) == {"0": 1.0, "2": 1.0}


def test_a_module_named_twice_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        select_layers(SHARPNESS, ["fc1", "fc1"])


def test_validated_layer_keeps_the_candidate_of_least_validation_loss(tiny_model):
    from conftest import TinyClassifier, state

    from lightning_sa_unlearn import FirstOrder, Layers, SharpnessAwareUnlearning, ValidatedLayer

    model, datamodule = tiny_model
    start = state(model)
    update = FirstOrder()
    report = SharpnessAwareUnlearning(selection=ValidatedLayer(k=2), update=update, verbose=False).unlearn(
        model, datamodule
    )
    trials = report.selection_trials
    flattest = sorted(["net.conv", "net.fc1", "net.fc2"], key=report.layer_sharpness.get)[:2]  # BatchNorm excluded
    assert [t["layers"] for t in trials] == [[layer] for layer in flattest] + (
        [["net.fc2"]] if "net.fc2" not in flattest else []
    )
    x, y = datamodule.val

    def validation_loss(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m.eval()(x), y))

    by_hand = {}
    for trial in trials:  # a hand loop: the same update on each candidate alone, from the same weights
        reference = TinyClassifier()
        reference.load_state_dict(start)
        SharpnessAwareUnlearning(selection=Layers(trial["layers"]), update=update, verbose=False).unlearn(
            reference, datamodule
        )
        by_hand[trial["layers"][0]] = validation_loss(reference)
        assert trial["validation_objective"] == pytest.approx(by_hand[trial["layers"][0]], rel=1e-5)
    best = min(by_hand, key=by_hand.get)
    assert report.selected_layers == [best] and [t["chosen"] for t in trials].count(True) == 1
    assert validation_loss(model) == pytest.approx(by_hand[best], rel=1e-5)
