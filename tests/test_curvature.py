"""hessian_diagonal against an exact Hessian from torch.autograd.functional.hessian (float64)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import autograd_hessian_diagonal, flat, relu_cnn, tanh_mlp
from torch import nn

from lightning_sa_unlearn import hessian_diagonal


def relative_error(estimate, reference):
    return float((estimate - reference).norm() / reference.norm())


@pytest.fixture
def cnn_data():
    torch.manual_seed(0)
    return relu_cnn(), torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (20,))


@pytest.fixture
def mlp_data():
    torch.manual_seed(1)
    return tanh_mlp(), torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))


def split(x, y, *sizes):
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


@pytest.mark.parametrize("fixture", ["cnn_data", "mlp_data"])
def test_exact_matches_autograd_hessian(fixture, request):
    model, x, y = request.getfixturevalue(fixture)
    reference = autograd_hessian_diagonal(model, x, y)
    diag = hessian_diagonal(model, split(x, y, 7, len(y) - 7), method="exact")
    assert relative_error(flat(diag), reference) < 1e-10
    assert list(diag) == [n for n, _ in model.named_parameters()]
    assert all(diag[n].shape == p.shape for n, p in model.named_parameters())


def test_ggn_equals_hessian_on_relu_maxpool_cnn(cnn_data):
    model, x, y = cnn_data
    reference = autograd_hessian_diagonal(model, x, y)
    ggn = flat(hessian_diagonal(model, split(x, y, 5, 15), method="ggn", chunk_size=4))
    assert relative_error(ggn, reference) < 1e-6


def test_ggn_differs_from_hessian_on_tanh(mlp_data):
    model, x, y = mlp_data
    reference = autograd_hessian_diagonal(model, x, y)
    ggn = flat(hessian_diagonal(model, [(x, y)], method="ggn"))
    assert relative_error(ggn, reference) > 0.05
    assert (ggn >= 0).all()  # the Gauss-Newton part is positive semi-definite


def test_ggn_for_cross_entropy_is_expected_squared_gradient(mlp_data):
    """diag GGN = (1/N) Σ_n Σ_c p_nc (∇ℓ(x_n, c))², computed here with a loop of autograd.grad."""
    model, x, y = mlp_data
    params = list(model.parameters())
    expected = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for n in range(len(x)):
        p = torch.softmax(model(x[n : n + 1]), -1).detach()[0]
        for c in range(3):
            loss = F.cross_entropy(model(x[n : n + 1]), torch.tensor([c]))
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
            expected += p[c] * g**2
    expected /= len(x)
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], method="ggn")), expected) < 1e-12


def test_ggn_of_another_loss_uses_its_output_hessian(cnn_data):
    """Squared error on a piecewise-linear net: GGN = Hessian again, through the eigen-factor path."""
    model, x, y = cnn_data

    def squared_error(logits, targets):
        return F.mse_loss(logits, torch.zeros_like(logits).scatter(-1, targets[:, None], 1.0))

    reference = autograd_hessian_diagonal(model, x, y, loss_fn=squared_error)
    ggn = flat(hessian_diagonal(model, [(x, y)], method="ggn", loss_fn=squared_error))
    assert relative_error(ggn, reference) < 1e-6


def test_hutchinson_converges_to_exact(mlp_data):
    model, x, y = mlp_data
    reference = autograd_hessian_diagonal(model, x, y)
    errors = {}
    for probes in (4, 400, 4000):
        generator = torch.Generator().manual_seed(0)
        estimate = hessian_diagonal(
            model, [(x, y)], method="hutchinson", num_probes=probes, generator=generator, chunk_size=256
        )
        errors[probes] = relative_error(flat(estimate), reference)
    assert errors[4] > errors[400] > errors[4000]
    assert errors[4000] < 0.1


def test_hutchinson_is_reproducible_with_a_generator(mlp_data):
    model, x, y = mlp_data
    first, second = (
        flat(
            hessian_diagonal(
                model, [(x, y)], method="hutchinson", num_probes=5, generator=torch.Generator().manual_seed(3)
            )
        )
        for _ in range(2)
    )
    assert torch.equal(first, second)


def test_empirical_fisher_is_mean_squared_gradient(mlp_data):
    model, x, y = mlp_data
    params = list(model.parameters())
    expected = sum(
        torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), params)]
        )
        ** 2
        for n in range(len(x))
    ) / len(x)
    estimate = flat(hessian_diagonal(model, split(x, y, 10, 14), method="empirical_fisher"))
    assert relative_error(estimate, expected) < 1e-12


def test_eval_mode_is_used_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    diag = flat(hessian_diagonal(model, [(x, y)], method="exact"))
    assert [m.training for m in model] == [True, True, True, False]
    reference = autograd_hessian_diagonal(model.eval(), x, y)
    assert relative_error(diag, reference) < 1e-10


def test_frozen_parameters_get_no_entry(cnn_data):
    model, x, y = cnn_data
    model[0].weight.requires_grad_(False)
    diag = hessian_diagonal(model, [(x, y)], method="ggn")
    assert "0.weight" not in diag and "0.bias" in diag


def test_exact_refuses_large_models():
    model = nn.Linear(300, 200)
    with pytest.raises(ValueError, match="exact_max_parameters.*ggn"):
        hessian_diagonal(model, [(torch.randn(2, 300), torch.tensor([0, 1]))], method="exact")


def test_bad_arguments_are_refused(cnn_data):
    model, x, y = cnn_data
    with pytest.raises(ValueError, match="empty"):
        hessian_diagonal(model, [], method="ggn")
    with pytest.raises(ValueError, match="unknown curvature method"):
        hessian_diagonal(model, [(x, y)], method="kfac")
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_diagonal(relu_cnn().requires_grad_(False), [(x, y)])


@pytest.mark.parametrize("form", ["direct", "gram", "default"])
@pytest.mark.parametrize("method", ["ggn", "empirical_fisher", "mc_ggn"])
def test_hook_path_equals_vmap_path_on_a_residual_network(method, form, monkeypatch):
    """Hooks and one batched backward against per-example vmap, with in-place ReLU, `+=` and a Conv1d.

    Every layer through per-example products ("direct"), every layer through Gram matrices
    ("gram"), and the size-based choice ("default"); the first two one example per chunk.
    """
    from torchvision.models.resnet import BasicBlock

    from lightning_sa_unlearn.curvature import ggn_fast

    if form != "default":
        monkeypatch.setattr(ggn_fast, "_GRAM_MAX_POSITIONS_PER_ROW", 0 if form == "direct" else 10**6)
        monkeypatch.setattr(ggn_fast, "_CHUNK_ELEMENTS", 1)

    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            BasicBlock(4, 4),
            BasicBlock(4, 8, stride=2, downsample=downsample),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
            nn.Unflatten(1, (1, 5)),
            nn.Conv1d(1, 1, 3, padding=1),
            nn.Flatten(),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(), module.running_var.uniform_(0.5, 2), module.weight.normal_()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    options = dict(method=method, num_samples=3, chunk_size=4)
    assert ggn_fast.supports(model)
    hooks = hessian_diagonal(model, [(x, y)], generator=torch.Generator().manual_seed(0), **options)
    monkeypatch.setattr(ggn_fast, "supports", lambda model: False)
    reference = hessian_diagonal(model, [(x, y)], generator=torch.Generator().manual_seed(0), **options)
    assert list(hooks) == list(reference)
    assert relative_error(flat(hooks), flat(reference)) < 1e-12


def test_mc_ggn_is_unbiased(cnn_data):
    model, x, y = cnn_data
    exact = flat(hessian_diagonal(model, [(x, y)], method="ggn"))
    errors = [
        relative_error(
            flat(
                hessian_diagonal(
                    model, [(x, y)], method="mc_ggn", num_samples=m, generator=torch.Generator().manual_seed(1)
                )
            ),
            exact,
        )
        for m in (1, 100, 3000)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05
    with pytest.raises(ValueError, match="cross_entropy"):
        hessian_diagonal(model, [(x, y)], method="mc_ggn", loss_fn=lambda a, b: F.cross_entropy(a, b))


def test_ggn_of_a_single_logit_is_zero():
    """Cross-entropy over one class is constant: its Hessian (and GGN) is zero."""
    model = nn.Linear(4, 1).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    diag = hessian_diagonal(model, [(x, y)], method="ggn")
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag.values())
    torch.testing.assert_close(flat(diag), autograd_hessian_diagonal(model, x, y))


def test_monte_carlo_labels_drawn_from_the_hooks_forward_match_a_separate_pass(monkeypatch):
    """The hook path samples its labels from the logits of its own forward: the same draws, hence the same
    estimate, as the per-example path that samples them in a pass of its own; one forward per batch."""
    from lightning_sa_unlearn.curvature import ggn_fast

    model = relu_cnn().double().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    forwards = []
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(len(inputs[0])))
    options = dict(method="mc_ggn", chunk_size=8)
    hooks = hessian_diagonal(model, batches, generator=torch.Generator().manual_seed(1), **options)
    assert forwards[-1:] == [20]  # the second batch: one forward over the whole batch, no sampling pass
    monkeypatch.setattr(ggn_fast, "supports", lambda model: False)
    separate = hessian_diagonal(model, batches, generator=torch.Generator().manual_seed(1), **options)
    torch.testing.assert_close(flat(hooks), flat(separate), rtol=1e-10, atol=0)


def test_a_sequential_pass_scales_its_samples_to_a_small_training_set():
    from lightning_sa_unlearn.curvature import MonteCarloGGN

    default = MonteCarloGGN()
    assert default.scaled(47_500) == (64, 10_000)  # MNIST-sized: as before
    assert default.scaled(5_000) == (16, 1_250)  # 8 batches of 16 at least, a quarter at most
    assert default.scaled(240) == (16, 128)
    assert default.scaled(None) == (64, 10_000)  # a loader without a size: the defaults
    assert MonteCarloGGN(max_samples=3_000).scaled(5_000) == (64, 3_000)  # set by the user: read as told
