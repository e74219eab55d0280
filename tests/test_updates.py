"""The forget gradient, the first-order step, τ search and fine-tuning, against hand computation."""

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import relu_cnn

from lightning_sa_unlearn import forget_gradient
from lightning_sa_unlearn.updates import apply_first_order, choose_tau, fine_tune, interleave, mean_loss


@pytest.fixture
def forget_data():
    torch.manual_seed(0)
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    wrong, right = torch.randint(0, 3, (10,)), torch.randint(0, 3, (10,))
    return relu_cnn(), x, wrong, right


def per_sample_reference(model, x, wrong, right):
    """G = Σ_i ∇[ℓ(x_i, ỹ_i) − ℓ(x_i, y_i)], one sample at a time."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), right[i : i + 1]) - F.cross_entropy(
            model(x[i : i + 1]), wrong[i : i + 1]
        )
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    return dict(zip([n for n, _ in model.named_parameters()], total))


def test_forget_gradient_is_sum_reduced_eq7(forget_data):
    model, x, wrong, right = forget_data
    reference = per_sample_reference(model, x, wrong, right)
    gradient = forget_gradient(
        model, [(x[:4], wrong[:4]), (x[4:], wrong[4:])], [(x[:4], right[:4]), (x[4:], right[4:])]
    )
    for name in reference:
        torch.testing.assert_close(gradient[name], reference[name], rtol=1e-12, atol=1e-12)


def test_sample_unlearning_gradient_is_ascent(forget_data):
    model, x, wrong, _ = forget_data
    gradient = forget_gradient(model, [(x, wrong)])
    loss = -F.cross_entropy(model(x), wrong, reduction="sum")
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for g, e in zip(gradient.values(), expected):
        torch.testing.assert_close(g, e)


def test_first_order_step_touches_only_named_parameters(forget_data):
    model, x, wrong, right = forget_data
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient = per_sample_reference(model, x, wrong, right)
    apply_first_order(model, gradient, ["4.weight", "4.bias"], tau=0.3)
    for name, p in model.named_parameters():
        if name.startswith("4."):
            torch.testing.assert_close(p.detach(), before[name] - 0.3 * gradient[name], rtol=1e-14, atol=1e-15)
        else:
            assert torch.equal(p.detach(), before[name])


def test_mismatched_forget_and_corrected_sets_are_refused(forget_data):
    model, x, wrong, right = forget_data
    with pytest.raises(ValueError, match="differ in length"):
        forget_gradient(model, [(x, wrong)], [(x[:9], right[:9])])
    with pytest.raises(ValueError, match="differ in length"):
        forget_gradient(model, [(x[:5], wrong[:5]), (x[5:], wrong[5:])], [(x[:5], right[:5])])
    with pytest.raises(ValueError, match="forget set is empty"):
        forget_gradient(model, [])


def test_choose_tau_takes_the_grid_minimum_of_the_validation_loss(forget_data):
    model, x, wrong, right = forget_data
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gradient = per_sample_reference(model, x, wrong, right)
    names = ["4.weight", "4.bias"]
    grid = [0.0, 0.01, 0.1, 1.0]
    val = [(torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (30,)))]
    # Independent: evaluate each τ on a fresh copy.
    expected = {}
    for tau in grid:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n] - tau * gradient[n] if n in names else start[n])
        expected[tau] = F.cross_entropy(model(val[0][0]), val[0][1]).item()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    tau, losses = choose_tau(model, gradient, names, grid, lambda m: mean_loss(m, val))
    assert losses == pytest.approx(expected)
    assert tau == min(expected, key=expected.get)
    torch.testing.assert_close(
        model[4].weight.detach(), start["4.weight"] - tau * gradient["4.weight"], rtol=1e-14, atol=1e-15
    )


def test_fine_tune_updates_only_selected_and_restores_flags(forget_data):
    model, x, wrong, right = forget_data
    model[1].requires_grad_(False)  # a user-frozen module stays frozen afterwards
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    retain = [(x[:6], right[:6]), (x[6:], right[6:])]
    steps = fine_tune(model, ["6.weight", "6.bias"], [retain], epochs=3, lr=0.1)
    assert steps == 6
    for name, p in model.named_parameters():
        assert p.requires_grad == flags[name]
        assert torch.equal(p.detach(), before[name]) != name.startswith("6.")


def test_interleave_serves_every_batch_once():
    sources = [list(range(5)), list(range(100, 103))]
    served = list(interleave(sources, random.Random(0)))
    assert sorted(served) == sorted(sources[0] + sources[1])
    assert [b for b in served if b < 100] == sources[0]
