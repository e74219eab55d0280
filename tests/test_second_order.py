"""Updates beyond first order, parameter masks and the newton_decrement rule, against dense references."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, TinyClassifier, assert_same_state, relu_cnn, state
from torch import nn

from lightning_sa_unlearn import (
    CG,
    GGN,
    FineTune,
    FirstOrder,
    Flattest,
    ForgetLossDescent,
    LastLayer,
    LiSSA,
    Measurements,
    NewtonDecrement,
    SecondOrder,
    SharpnessAwareUnlearning,
    TopFraction,
    hessian_diagonal,
)
from lightning_sa_unlearn.selection import newton_decrement, top_fraction, trainable_layers
from lightning_sa_unlearn.updates import fine_tune, forget_loss_descent
from lightning_sa_unlearn.updates.solvers import (
    conjugate_gradient,
    damped,
    hessian_vector_product,
    largest_eigenvalue,
    lissa,
)


def dense_sum_hessian(model, x, y, names):
    """Hessian of Σ_n ℓ_n with respect to the parameters `names`, from torch.autograd.functional.hessian."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    start = torch.cat([params[n].reshape(-1) for n in names])

    def loss(vector):
        values, offset = dict(params), 0
        for n in names:
            values[n] = vector[offset : offset + params[n].numel()].view_as(params[n])
            offset += params[n].numel()
        return F.cross_entropy(torch.func.functional_call(model, values, (x,)), y, reduction="sum")

    return torch.autograd.functional.hessian(loss, start)


@pytest.fixture
def problem(request):
    torch.manual_seed(0)
    model = relu_cnn()
    x, y = torch.randn(40, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    names = ["4.weight", "4.bias"]
    g = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in names}
    damping = getattr(request, "param", 0.1)
    matrix = dense_sum_hessian(model, x, y, names) + damping * torch.eye(
        sum(v.numel() for v in g.values()), dtype=torch.float64
    )
    expected = torch.linalg.solve(matrix, torch.cat([v.reshape(-1) for v in g.values()]))
    matvec = damped(hessian_vector_product(model, [(x[:15], y[:15]), (x[15:], y[15:])], names), damping)
    return matvec, g, expected


def flat(v):
    return torch.cat([t.reshape(-1) for t in v.values()])


def test_conjugate_gradient_matches_a_dense_solve(problem):
    matvec, g, expected = problem
    result = conjugate_gradient(matvec, g, max_iterations=200, tolerance=1e-10)
    assert result.reason == "converged" and result.ok
    assert float((flat(result.x) - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("problem", [1.0], indirect=True)
def test_lissa_matches_a_dense_solve(problem):
    """LiSSA converges linearly (about κ iterations), so it gets more of them; the tolerance is the same 1e-4."""
    matvec, g, expected = problem
    scale = 1.1 * largest_eigenvalue(matvec, g, iterations=50)
    result = lissa(matvec, g, scale=scale, max_iterations=20_000, tolerance=1e-9)
    assert result.ok
    assert float((flat(result.x) - expected).norm() / expected.norm()) < 1e-4


def test_lissa_with_too_small_a_scale_diverges(problem):
    matvec, g, _ = problem
    result = lissa(matvec, g, scale=1e-3, max_iterations=200)
    assert result.reason == "diverged" and not result.ok


def float64_tiny():
    model = TinyClassifier().double()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("on_update", [False, True], ids=["damping on the curvature part", "damping on SecondOrder"])
@pytest.mark.parametrize(
    "solver, damping, options",
    [
        (CG(), 0.5, {}),
        (LiSSA(max_iterations=20_000, tolerance=1e-8), 20.0, {}),  # more damping: LiSSA needs ~κ iterations
    ],
)
def test_second_order_update_through_the_callback(solver, damping, options, on_update):
    model, datamodule = float64_tiny(), TensorDataModule()
    names = ["net.fc2.weight", "net.fc2.bias"]
    before = state(model)
    x, poisoned, y, n = datamodule.x.double(), datamodule.poisoned, datamodule.y, datamodule.num_forget
    model.eval()
    hessian = dense_sum_hessian(model, x, poisoned, names)
    params = [dict(model.named_parameters())[name] for name in names]
    loss = F.cross_entropy(model(x[:n]), y[:n], reduction="sum") - F.cross_entropy(
        model(x[:n]), poisoned[:n], reduction="sum"
    )
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
    step = torch.linalg.solve(hessian + damping * torch.eye(len(g), dtype=g.dtype), g)

    if on_update:  # the update's own damping wins over the curvature part's
        curvature, update = GGN(samples="all", damping=123.0), SecondOrder(1.0, solver=solver, damping=damping)
    else:
        curvature, update = GGN(samples="all", damping=damping), SecondOrder(1.0, solver=solver)
    report = SharpnessAwareUnlearning(curvature=curvature, update=update, selection=["net.fc2"], verbose=False).unlearn(
        model, datamodule
    )
    assert report.solver["damping"] == damping
    expected = torch.cat([before[name].reshape(-1) for name in names]) - step
    updated = torch.cat([dict(model.named_parameters())[name].detach().reshape(-1) for name in names])
    assert float((updated - expected).norm() / step.norm()) < 1e-4
    assert report.solver["name"] == solver.name and report.solver["relative_residual"] < 1e-4
    assert report.solver["iterations"] >= 1
    assert_same_state(model, before, except_names=set(names))


def test_failed_solve_restores_or_falls_back(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    diverging = LiSSA(scale=1e-6, max_iterations=50)
    with pytest.raises(RuntimeError, match="solve failed.*diverged"):
        SharpnessAwareUnlearning(update=SecondOrder(solver=diverging), verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)

    # the fallback's fixed step is harmful here (the guard would refuse it); this is about the fallback's arithmetic
    update = SecondOrder(0.01, solver=diverging, fallback=True)
    report = SharpnessAwareUnlearning(update=update, selection=["net.fc1"], verbose=False, harm_guard=False).unlearn(
        model, datamodule
    )
    assert "applied first_order instead" in report.fallback and report.tau == 0.01
    reference = TinyClassifier()
    reference.load_state_dict(before)
    SharpnessAwareUnlearning(update=FirstOrder(0.01), selection=["net.fc1"], verbose=False, harm_guard=False).unlearn(
        reference, datamodule
    )
    assert torch.equal(reference.net.fc1.weight, model.net.fc1.weight)


def test_forget_loss_descent_equals_hand_computed_steps():
    torch.manual_seed(0)
    model = relu_cnn()
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    wrong, right = torch.randint(0, 3, (12,)), torch.randint(0, 3, (12,))
    retain = (torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (20,)))
    names = ["4.weight", "4.bias"]
    reference = relu_cnn()
    reference.load_state_dict(model.state_dict())
    lr, weight = 0.05, 0.5
    for _ in range(3):  # J = (Σ ℓ(x, ỹ) − Σ ℓ(x, y)) / 12 + 0.5 · mean retain loss
        params = [reference[4].weight, reference[4].bias]
        loss = (
            F.cross_entropy(reference(x), right, reduction="sum")
            - F.cross_entropy(reference(x), wrong, reduction="sum")
        ) / 12
        loss = loss + weight * F.cross_entropy(reference(retain[0]), retain[1])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    steps = forget_loss_descent(
        model,
        names,
        [(x[:5], wrong[:5]), (x[5:], wrong[5:])],
        [(x[:5], right[:5]), (x[5:], right[5:])],
        [retain],
        steps=3,
        lr=lr,
        retain_weight=weight,
    )
    assert steps == 3
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-12, atol=1e-12)


def test_forget_loss_update_through_the_callback_touches_only_selected(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    report = SharpnessAwareUnlearning(
        update=ForgetLossDescent(steps=3, lr=0.05), selection="last", verbose=False
    ).unlearn(model, datamodule)
    assert 1 <= report.update_steps <= 3 and report.selected_layers == ["net.fc2"]  # best step on validation
    assert not torch.equal(model.net.fc2.weight, before["net.fc2.weight"])
    assert_same_state(model, before, except_names={"net.fc2.weight", "net.fc2.bias"})


@pytest.mark.parametrize(
    "optimizer, options", [("sgd", dict(momentum=0.9, weight_decay=0.1)), ("adam", dict(weight_decay=0.1))]
)
def test_masked_out_entries_stay_bitwise_identical(optimizer, options):
    torch.manual_seed(0)
    model = relu_cnn()
    x, y = torch.randn(30, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (30,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {"4.weight": torch.rand(before["4.weight"].shape) < 0.3, "6.bias": torch.tensor([True, False, True])}
    fine_tune(
        model,
        ["4.weight", "6.bias"],
        [[(x[:10], y[:10]), (x[10:], y[10:])]],
        epochs=5,
        lr=0.1,
        optimizer=optimizer,
        masks=masks,
        **options,
    )
    for name, p in model.named_parameters():
        if name in masks:
            assert torch.equal(p[~masks[name]], before[name][~masks[name]])
            assert (p[masks[name]] != before[name][masks[name]]).all()
        else:
            assert torch.equal(p, before[name])


def test_parameter_granularity_updates_the_flattest_fraction(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    diag = hessian_diagonal(model, datamodule.train_dataloader())
    report = SharpnessAwareUnlearning(
        selection=TopFraction(Flattest(), fraction=0.1),
        update=FineTune(optimizer="adam", weight_decay=0.1),
        verbose=False,
    ).unlearn(model, datamodule)
    total = sum(d.numel() for d in diag.values())
    assert report.num_updated_parameters == math.ceil(0.1 * total)
    changed = {n: p.detach() != before[n] for n, p in model.named_parameters()}
    moved = torch.cat([diag[n][changed[n]] for n in diag])
    still = torch.cat([diag[n][~changed[n]] for n in diag])
    assert 0 < moved.numel() <= report.num_updated_parameters
    assert moved.max() <= still.min() * (1 + 1e-4)  # only the flattest entries moved
    assert_same_state(model, before, except_names=set(diag))  # buffers untouched


def test_top_fraction_counts_exactly():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.5, 4.0])}
    masks = top_fraction(scores, 0.4, largest=True)
    assert masks["b"].tolist() == [False, True] and masks["a"].tolist() == [True, False, False]
    assert list(top_fraction(scores, 0.2, largest=False)) == ["b"]


def test_newton_decrement_on_a_hand_built_example():
    net = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1, bias=False))
    gradient = {
        "0.weight": torch.tensor([[1.0], [2.0]]),
        "0.bias": torch.tensor([0.0, 1.0]),
        "1.weight": torch.tensor([[3.0, 3.0]]),
    }
    diag = {
        "0.weight": torch.tensor([[1.0], [3.0]]),
        "0.bias": torch.tensor([1.0, 1.0]),
        "1.weight": torch.tensor([[8.0, 17.0]]),
    }
    # layer 0: (1/2 + 4/4 + 0/2 + 1/2) / 4 = 0.5 ; layer 1: (9/9 + 9/18) / 2 = 0.75, with λ = 1
    scores = newton_decrement(net, gradient, diag, damping=1.0)
    assert scores == pytest.approx({"0": 0.5, "1": 0.75})
    measured = Measurements(net, trainable_layers(net), gradient=gradient, diagonal_sum=diag, damping=1.0)
    assert NewtonDecrement().select(measured).layers == ["1"]
    assert NewtonDecrement(num_layers=2).select(measured).layers == ["1", "0"]
    far = Measurements(net, trainable_layers(net), gradient=gradient, diagonal_sum=diag, damping=99.0)
    assert NewtonDecrement(damping=1.0).scores(far) == pytest.approx({"0": 0.5, "1": 0.75})  # its own λ wins


def test_newton_decrement_through_the_callback(tiny_model):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection="newton_decrement", verbose=False).unlearn(model, datamodule)
    assert report.selected_layers == [max(report.newton_decrement, key=report.newton_decrement.get)]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GGN(damping=-1.0), "damping must be >= 0"),
        (lambda: TopFraction(Flattest(), fraction=0.0), "fraction must be in \\(0, 1\\]"),
        (lambda: TopFraction(Flattest(), fraction=1.5), "fraction must be in \\(0, 1\\]"),
        (lambda: ForgetLossDescent(steps=0), "steps >= 1"),
        (lambda: TopFraction(LastLayer(), fraction=0.1), "ranks single entries"),
        (lambda: SecondOrder(solver="newton"), "solver='newton' is not a Solver"),
        (lambda: FineTune(optimizer="rmsprop"), "unknown optimizer"),
        (lambda: CG(max_iterations=0), "max_iterations must be >= 1"),
    ],
)
def test_bad_part_settings_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_an_override_of_select_layers_cannot_pick_entries_and_is_deprecated():
    class ConvOnly(SharpnessAwareUnlearning):
        def select_layers(self, sharpness):
            return ["net.conv"]

    with pytest.raises(ValueError, match="overrides select_layers.*single entries"):
        ConvOnly(selection=TopFraction(Flattest(), fraction=0.1))
    with pytest.warns(DeprecationWarning, match=r"select_layers\(sharpness\), which is deprecated.*Selection part"):
        ConvOnly()


def test_hessian_vector_products_through_weight_norm_match_plain_operations():
    """torch's fused weight-norm kernel has a wrong double backward; the second-order update must not use it."""
    torch.manual_seed(0)
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3)).double()
    g = normed[0].parametrizations.weight.original0.detach()
    v = normed[0].parametrizations.weight.original1.detach()

    def plain(theta, x):  # the same network from primitives: w = g · v / ‖v‖ per output row
        w = theta["g"] * theta["v"] / theta["v"].norm(dim=1, keepdim=True)
        return torch.tanh(x @ w.t() + normed[0].bias) @ normed[2].weight.t() + normed[2].bias

    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    names = ["0.parametrizations.weight.original0", "0.parametrizations.weight.original1"]
    direction = {names[0]: torch.randn_like(g), names[1]: torch.randn_like(v)}
    product = hessian_vector_product(normed, [(x, y)], names)(direction)

    def loss(g_, v_):
        return F.cross_entropy(plain({"g": g_, "v": v_}, x), y, reduction="sum")

    _, reference = torch.autograd.functional.hvp(loss, (g, v), (direction[names[0]], direction[names[1]]))
    torch.testing.assert_close(product[names[0]], reference[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(product[names[1]], reference[1], rtol=1e-8, atol=1e-10)
