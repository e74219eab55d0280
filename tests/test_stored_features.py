"""The step-size search and the harm guard on stored outputs of the frozen layers: the numbers of the whole model."""

import pytest
import torch
from conftest import TinyClassifier, assert_same_state, state

from lightning_sa_unlearn import Layers, SharpnessAwareUnlearning
from lightning_sa_unlearn.guard import HarmfulUpdateError
from lightning_sa_unlearn.updates import Update
from lightning_sa_unlearn.updates.cached_features import StoredFeatures


def samples_through(module):
    seen = []
    module.register_forward_hook(lambda m, inputs, output: seen.append(len(inputs[0])))
    return seen


@pytest.mark.parametrize("layer", ["net.fc2", "net.fc1"])
def test_search_and_guard_on_stored_features_equal_the_whole_model(monkeypatch, tiny_model, layer):
    model, datamodule = tiny_model
    twin = TinyClassifier()
    twin.load_state_dict(model.state_dict())
    reports, conv_samples = [], []
    for target, stored in ((model, True), (twin, False)):
        if not stored:
            monkeypatch.setattr(StoredFeatures, "find", classmethod(lambda cls, *args: None))
        seen = samples_through(target.net.conv)
        callback = SharpnessAwareUnlearning(selection=Layers([layer]), verbose=False)
        reports.append(callback.unlearn(target, datamodule))
        conv_samples.append(sum(seen))
    cached, whole = reports
    assert cached.tau > 0 and cached.tau == whole.tau and cached.tau_search == whole.tau_search
    for key in ("before", "after", "standard_error", "samples"):
        assert cached.harm_guard[key] == whole.harm_guard[key], key
    assert cached.harm_guard["stored_below"] == {"net.fc2": "net.relu2", "net.fc1": "net.flatten"}[layer]
    assert whole.harm_guard["stored_below"] is None
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    # the search's points and the guard's second pass ran the layers above only: the convolution saw far fewer samples
    validation = cached.validation_samples + cached.harm_guard["samples"]
    assert conv_samples[1] - conv_samples[0] >= 2 * validation


class MovesALayerBelow(Update):
    """A custom update that (wrongly) rewrites a frozen layer below the selected one."""

    name = "moves_below"
    needs_forget_gradient = False

    def apply(self, run):
        with torch.no_grad():
            run.model.net.conv.weight.mul_(-3.0)
        return {}


def test_the_guard_runs_the_whole_model_when_a_layer_below_changed(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    callback = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), update=MovesALayerBelow(), verbose=False)
    with pytest.raises(HarmfulUpdateError, match="The weights were restored"):
        callback.unlearn(model, datamodule)
    assert_same_state(model, before)


def test_stored_features_notice_a_changed_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))]
    features = StoredFeatures.find(model, ["2.weight", "2.bias"], batches)
    assert features is not None and features.path == "1" and features.current()
    stored = features.store(batches)
    model.eval()
    assert torch.equal(features.above(stored[0][0]), model(batches[0][0]))
    model[1].running_mean.add_(1.0)
    assert not features.current()
