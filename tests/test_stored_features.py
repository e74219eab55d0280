"""The step-size search and the harm guard on stored outputs of the frozen layers: the numbers of the whole model."""

import pytest
import torch
from conftest import TinyClassifier, assert_same_state, state

from lightning_sa_unlearn import Layers, SharpnessAwareUnlearning
from lightning_sa_unlearn.guard import HarmfulUpdateError
from lightning_sa_unlearn.objective.stored_features import StoredFeatures
from lightning_sa_unlearn.updates import Update


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
        callback = SharpnessAwareUnlearning(selection=Layers([layer]), update="first_order", verbose=False)
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
    # one store for both: the guard's pass through the layers below (90 validation samples and a 32-sample probe)
    # is the only one; the search read the guard's stored outputs
    assert cached.sample_passes["harm_guard"]["forward"] == 90 + 32 and "forward" not in cached.sample_passes["update"]
    assert whole.sample_passes["update"]["forward"] > 0


class MovesALayerBelow(Update):
    """A custom update that (wrongly) rewrites a frozen layer below the selected one."""

    name = "moves_below"
    needs_forget_gradient = False

    def apply(self, inputs):
        with torch.no_grad():
            inputs.model.net.conv.weight.mul_(-3.0)
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


class FlattenFirst(TinyClassifier):
    """A forward that reshapes its input before the chain: the chain cannot take the model's input."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x.flatten(1))


class Tempered(torch.nn.Sequential):
    def forward(self, x):
        return super().forward(x) / 4


class TemperedClassifier(FlattenFirst):
    """A Sequential subclass whose own forward scales the chain's output: its slices would apply it twice."""

    def __init__(self):
        super().__init__()
        self.net = Tempered(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class MLP(torch.nn.Sequential):
    """A Sequential subclass with an __init__ of its own (slicing it would call MLP(OrderedDict))."""

    def __init__(self, hidden):
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))


class SubclassedChain(FlattenFirst):
    def __init__(self):
        super().__init__()
        self.net = MLP(16)

    def forward(self, x):
        return self.net(x)


class Residual(TinyClassifier):
    """A skip connection across the selected layer: no chain holds it, its traced graph splits at ``h``."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = self.net.relu2(self.net.fc1(self.net.flatten(self.net.pool(self.net.relu(self.net.bn(self.net.conv(x)))))))
        return self.net.fc2(h + self.block(h))


@pytest.mark.parametrize(
    "make, layer, stored_below",
    [
        (FlattenFirst, "net.2", "net.1"),  # these three through the traced graph, the fourth through its chain
        (TemperedClassifier, "net.3", "net.2"),
        (Residual, "block", "net.relu2"),
        (SubclassedChain, "net.3", "net.2"),
    ],
)
def test_models_beyond_a_plain_chain_get_the_whole_models_numbers(monkeypatch, tiny_model, make, layer, stored_below):
    _, datamodule = tiny_model
    torch.manual_seed(0)
    model = make()
    twin = make()
    twin.load_state_dict(model.state_dict())
    reports = []
    for target, stored in ((model, True), (twin, False)):
        if not stored:
            monkeypatch.setattr(StoredFeatures, "find", classmethod(lambda cls, *args: None))
        callback = SharpnessAwareUnlearning(selection=Layers([layer]), verbose=False)
        reports.append(callback.unlearn(target, datamodule))
    assert reports[0].harm_guard["stored_below"] == stored_below
    assert reports[0].tau == reports[1].tau and reports[0].tau_search == reports[1].tau_search
    for key in ("before", "after", "standard_error"):
        assert reports[0].harm_guard[key] == reports[1].harm_guard[key], key


def test_stored_features_notice_a_change_through_data_and_count_released_bytes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))]
    features = StoredFeatures.find(model, ["2.weight"], batches)
    stored = features.store(batches)
    assert features.bytes == 5 * 4 * 4  # five samples of four float32 features
    features.release(stored)
    assert features.bytes == 0
    model[0].weight.data[1, 2] += 0.5  # not through autograd's version counter
    assert not features.current()


def test_stores_over_their_byte_limit_leave_the_whole_model(monkeypatch, tiny_model):
    from lightning_sa_unlearn.objective import stored_features as cached_features

    model, datamodule = tiny_model
    monkeypatch.setattr(cached_features, "MAX_STORED_BYTES", 1000)  # less than one batch of features
    report = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), verbose=False).unlearn(model, datamodule)
    assert report.harm_guard["stored_below"] is None
    assert "forward_above" not in report.sample_passes["harm_guard"]
    assert "forward_above" not in report.sample_passes["update"]
