"""Fine-tuning on cached features: the weights of running the whole model every epoch, for fewer passes."""

import pytest
import torch
from conftest import TinyClassifier

from lightning_sa_unlearn import FineTune, Layers, SharpnessAwareUnlearning
from lightning_sa_unlearn.objective.stored_features import FeatureCache, split_below
from lightning_sa_unlearn.updates import fine_tune


def copies(tiny_model):
    model, datamodule = tiny_model
    twin = TinyClassifier()
    twin.load_state_dict(model.state_dict())
    return model, twin, datamodule


def batches(datamodule):
    retain = list(datamodule.retain_dataloader())
    return [retain[: len(retain) // 2], retain[len(retain) // 2 :]]  # two sources, interleaved


def count_samples(module):
    seen = []
    module.register_forward_hook(lambda m, inputs, output: seen.append(len(inputs[0])))
    return seen


def test_split_below_finds_the_frozen_layers_of_a_chain(tiny_model):
    model, _ = tiny_model
    x = torch.randn(2, 1, 8, 8)
    below, above, path = split_below(model, ["net.fc2.weight", "net.fc2.bias"], x)
    assert path == "net.relu2" and list(above) == [model.net.fc2]
    assert torch.equal(above(below(x)), model(x))
    assert split_below(model, ["net.conv.weight"], x) is None  # nothing below the first layer


def test_a_model_that_is_not_its_chain_is_cut_through_its_traced_graph_unless_it_cannot_be_traced():
    class Scaled(TinyClassifier):
        def forward(self, x):
            return 2 * self.net(x)

    class Branching(TinyClassifier):
        def forward(self, x):
            return self.net(x) if x.sum() > 1e9 else -self.net(x)  # data-dependent: fx cannot trace it

    x = torch.randn(2, 1, 8, 8)
    model = Scaled().eval()
    below, above, path = split_below(model, ["net.fc2.weight"], x)
    assert path == "net.relu2" and torch.equal(above(below(x)), model(x))
    assert [name for name, _ in above.named_parameters()] == [
        "graph_module.net.fc2.weight",
        "graph_module.net.fc2.bias",
    ]
    assert "net.fc2.weight" not in dict(below.named_parameters())  # the frozen part holds no selected parameter
    assert split_below(Branching(), ["net.fc2.weight"], x) is None


@pytest.mark.parametrize("names", [["net.fc2.weight", "net.fc2.bias"], ["net.fc1.weight", "net.fc2.bias"]])
def test_three_epochs_on_cached_features_equal_three_epochs_of_the_whole_model(tiny_model, names):
    model, twin, datamodule = copies(tiny_model)
    sources = batches(datamodule)
    below, above, _ = split_below(model, names, sources[0][0][0])
    conv_calls, twin_conv_calls = count_samples(model.net.conv), count_samples(twin.net.conv)
    options = dict(epochs=3, lr=0.05, momentum=0.9, seed=3)
    cached = fine_tune(model, names, sources, cache=FeatureCache(below, sources), above=above, **options)
    whole = fine_tune(twin, names, sources, **options)
    assert cached == whole == 3 * sum(len(s) for s in sources)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    samples = sum(len(y) for source in sources for _, y in source)
    assert sum(conv_calls) == samples and sum(twin_conv_calls) == 3 * samples  # the frozen layers ran once


def test_the_callback_reports_the_retain_subsample_and_the_cache(tiny_model):
    model, twin, datamodule = copies(tiny_model)
    reports = []
    for target, cache in ((model, True), (twin, False)):
        update = FineTune(epochs=2, retain_samples=100, cache_features=cache)
        callback = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), update=update, verbose=False)
        reports.append(callback.unlearn(target, datamodule))
    assert reports[0].update_details == {"retain_samples": 100, "cached_below": "net.relu2"}
    assert reports[1].update_details == {"retain_samples": 100, "cached_below": None}
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_cache_over_its_byte_limit_is_dropped(monkeypatch, tiny_model):
    from lightning_sa_unlearn.objective import stored_features as cached_features

    model, twin, datamodule = copies(tiny_model)
    monkeypatch.setattr(cached_features, "MAX_CACHE_BYTES", 1000)
    sources = batches(datamodule)
    below, above, _ = split_below(model, ["net.fc2.weight"], sources[0][0][0])
    cache = FeatureCache(below, sources)
    fine_tune(model, ["net.fc2.weight"], sources, epochs=2, cache=cache, above=above)
    fine_tune(twin, ["net.fc2.weight"], sources, epochs=2)
    assert cache.dropped and not cache.usable
    assert torch.equal(model.net.fc2.weight, twin.net.fc2.weight)


def test_retain_samples_is_checked():
    with pytest.raises(ValueError, match="retain_samples must be >= 1"):
        FineTune(retain_samples=0)


def test_a_first_epoch_cut_short_leaves_no_cache_and_the_uncached_weights(tiny_model):
    """Under DDP every epoch is capped at the smallest process's batches: the store is incomplete and let go."""
    model, twin, datamodule = copies(tiny_model)
    sources = batches(datamodule)
    below, above, _ = split_below(model, ["net.fc2.weight"], sources[0][0][0])
    cache = FeatureCache(below, sources)
    options = dict(epochs=3, lr=0.05, steps_per_epoch=3, seed=1)
    fine_tune(model, ["net.fc2.weight"], sources, cache=cache, above=above, **options)
    fine_tune(twin, ["net.fc2.weight"], sources, **options)
    assert not cache.usable and cache.stored == [[], []]
    assert torch.equal(model.net.fc2.weight, twin.net.fc2.weight)


def test_the_report_names_no_cache_when_it_was_dropped(monkeypatch, tiny_model):
    from lightning_sa_unlearn.objective import stored_features as cached_features

    model, datamodule = tiny_model
    monkeypatch.setattr(cached_features, "MAX_CACHE_BYTES", 1000)
    update = FineTune(epochs=2, retain_samples=100)
    report = SharpnessAwareUnlearning(selection=Layers(["net.fc2"]), update=update, verbose=False).unlearn(
        model, datamodule
    )
    assert report.update_details == {"retain_samples": 100, "cached_below": None}


def test_fine_tuning_on_a_traced_split_equals_the_whole_model(tiny_model):
    """A skip connection across the selection: the traced graph's frontier is cached and the weights agree."""
    from test_stored_features import Residual

    _, datamodule = tiny_model
    torch.manual_seed(0)
    model, twin = Residual(), Residual()
    twin.load_state_dict(model.state_dict())
    names = ["block.weight", "block.bias", "net.fc2.weight"]
    sources = batches(datamodule)
    below, above, path = split_below(model, names, sources[0][0][0])
    assert path == "net.relu2"
    options = dict(epochs=3, lr=0.05, momentum=0.9, seed=3)
    fine_tune(model, names, sources, cache=FeatureCache(below, sources), above=above, **options)
    fine_tune(twin, names, sources, **options)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
