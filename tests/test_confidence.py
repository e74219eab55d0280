"""Standard errors of the layer sharpness, against hand-computed and repeated-sampling references."""

import math
import statistics

import pytest
import torch
from conftest import autograd_hessian_diagonal, relu_cnn

from lightning_sa_unlearn import GGN, MonteCarloGGN, SharpnessAwareUnlearning, pipeline
from lightning_sa_unlearn.curvature import hessian_diagonal
from lightning_sa_unlearn.curvature.confidence import (
    SharpnessStatistics,
    selection_margin,
    sharpness_with_standard_errors,
)
from lightning_sa_unlearn.selection import layer_sharpness, trainable_layers


def cnn_batches(sizes=(5, 9, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def layer_sums(model, flat_diagonal):
    """Per-layer means of a flat diagonal laid out like model.parameters()."""
    layers, offset, out = trainable_layers(model), 0, {}
    spans = {}
    for name, p in model.named_parameters():
        spans[name] = flat_diagonal[offset : offset + p.numel()]
        offset += p.numel()
    for layer, names in layers.items():
        out[layer] = float(torch.cat([spans[n] for n in names]).sum()) / sum(spans[n].numel() for n in names)
    return out


def test_means_equal_the_layer_sharpness():
    torch.manual_seed(0)
    model, batches = relu_cnn(), cnn_batches()
    means, _ = sharpness_with_standard_errors(model, batches, method="ggn")
    expected = layer_sharpness(model, hessian_diagonal(model, batches, method="ggn"))
    assert means.keys() == expected.keys()
    for layer in means:
        assert means[layer] == pytest.approx(expected[layer], rel=1e-12)


def test_standard_error_is_the_ratio_estimator_over_batches_by_hand():
    torch.manual_seed(0)
    model, batches = relu_cnn(), cnn_batches()
    # per-batch sums of the exact diagonal from torch.autograd.functional.hessian (mean loss × batch size)
    y = [layer_sums(model, autograd_hessian_diagonal(model, x, t) * len(t)) for x, t in batches]
    n = [len(t) for _, t in batches]
    _, errors = sharpness_with_standard_errors(model, batches, method="exact")
    for layer in errors:
        m = sum(b[layer] for b in y) / sum(n)
        residual = sum((b[layer] - m * size) ** 2 for b, size in zip(y, n))
        expected = math.sqrt(len(y) / (len(y) - 1) * residual) / sum(n)
        assert errors[layer] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method, options", [("hutchinson", dict(num_probes=1)), ("mc_ggn", dict(num_samples=1))])
def test_standard_error_matches_the_spread_over_repeated_runs(method, options):
    """Identical batches: only the Monte-Carlo noise varies, and the SE must predict its size."""
    torch.manual_seed(0)
    model = relu_cnn()
    x, t = cnn_batches(sizes=(6,))[0]
    batches = [(x, t)] * 8
    exact = layer_sharpness(model, hessian_diagonal(model, [(x, t)], method="ggn"))  # = diag H (ReLU net)
    estimates, reported = [], []
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        means, errors = sharpness_with_standard_errors(model, batches, method=method, generator=generator, **options)
        estimates.append(means)
        reported.append(errors)
    for layer in exact:
        values = [e[layer] for e in estimates]
        spread = statistics.stdev(values)
        typical_error = statistics.fmean(r[layer] for r in reported)
        assert typical_error == pytest.approx(spread, rel=0.35)  # the SE predicts the run-to-run spread
        assert abs(statistics.fmean(values) - exact[layer]) < 4 * spread / math.sqrt(len(values))  # unbiased


def test_selection_margin_by_hand():
    model = relu_cnn()
    stats = SharpnessStatistics(model)
    layers = trainable_layers(model)  # "0" (conv), "4" (fc1), "6" (fc2)
    sizes = {n: p.numel() for n, p in model.named_parameters()}

    def batch(values):  # a batch whose per-layer mean contributions are `values`
        part = {}
        for (layer, names), value in zip(layers.items(), values):
            for name in names:
                part[name] = torch.full((sizes[name],), value, dtype=torch.float64)
        return part

    stats.update(batch([1.0, 3.0, 6.0]), 1)
    stats.update(batch([3.0, 5.0, 6.0]), 1)
    means = stats.means()
    assert means == {"0": 2.0, "4": 4.0, "6": 6.0}
    margin = selection_margin(means, stats, ["0"], "flattest")
    # differences "4" − "0" are 2 and 2 in both batches: lead 2, no spread at all
    assert margin["runner_up"] == "4" and margin["lead"] == 2.0 and margin["standard_error"] == 0.0
    margin = selection_margin(means, stats, ["6"], "sharpest")
    # "6" − "4" is 3 then 1: mean 2, SE = sqrt(2/1 · ((3−2)² + (1−2)²)) / 2 = 1
    assert margin["runner_up"] == "4" and margin["lead"] == 2.0
    assert margin["standard_error"] == pytest.approx(1.0) and margin["lead_in_standard_errors"] == pytest.approx(2.0)
    assert selection_margin(means, stats, ["0"], "last") is None
    tie = SharpnessStatistics(model)
    tie.update(batch([1.0, 1.0, 6.0]), 1)
    tie.update(batch([1.0, 1.0, 6.0]), 1)
    assert selection_margin(tie.means(), tie, ["0"], "flattest")["lead_in_standard_errors"] == 0.0
    assert selection_margin(means, stats, ["4"], "flattest") is None  # not the rule's pick: a custom select_layers


def test_callback_warns_and_reports_a_narrow_lead(tiny_model, monkeypatch):
    model, datamodule = tiny_model

    def narrow(sharpness, statistics, selected, rule):
        return {"selected": selected[0], "runner_up": "x", "lead": 1e-9, "standard_error": 1.0,
                "lead_in_standard_errors": 1e-9}  # fmt: skip

    monkeypatch.setattr(pipeline, "selection_margin", narrow)
    with pytest.warns(UserWarning, match="only 0.00 standard errors"):  # a fixed count: the run itself warns
        report = SharpnessAwareUnlearning(GGN(samples="all"), verbose=False).unlearn(model, datamodule)
    assert report.selection_margin["lead_in_standard_errors"] == 1e-9


def test_callback_reports_standard_errors(tiny_model):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection="flattest", verbose=False, curvature=MonteCarloGGN()).unlearn(
        model, datamodule
    )
    assert report.sharpness_standard_error.keys() == report.layer_sharpness.keys()
    assert all(e > 0 for e in report.sharpness_standard_error.values())
    assert report.selection_margin["selected"] == report.selected_layers[0]
    assert "standard errors" in report.format_table()
