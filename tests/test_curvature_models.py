"""Models and losses users bring: each estimator computes what it names, or refuses and says what to use.

References in float64: the Hessian diagonal from ``torch.autograd.functional.hessian`` (conftest), and the GGN
diagonal ``diag(Jᵀ H_out J)`` from the whole batch's Jacobian (``torch.autograd.functional.jacobian``) and the
loss's full Hessian in the outputs (``torch.autograd.functional.hessian``), with nothing assumed about either.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import autograd_hessian_diagonal, flat
from torch import nn
from torch.func import functional_call

from lightning_sa_unlearn import GGN, Hutchinson, MonteCarloGGN, SharpnessAwareUnlearning, hessian_diagonal
from lightning_sa_unlearn.curvature import ggn_fast
from lightning_sa_unlearn.models import ImageClassifier
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.updates import FirstOrder

PER_EXAMPLE = ["ggn", "mc_ggn", "empirical_fisher"]


def relative_error(estimate, reference):
    return float((estimate - reference).norm() / reference.norm())


def trainable(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    start = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def unflatten(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            params[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return params

    return start, unflatten


def ggn_reference(model, x, y, loss_fn=F.cross_entropy):
    """``diag(Jᵀ H J)`` with J the Jacobian of all the batch's outputs and H the loss's full output Hessian."""
    start, unflatten = trainable(model)
    jacobian = torch.autograd.functional.jacobian(lambda v: functional_call(model, unflatten(v), (x,)), start)
    outputs = functional_call(model, unflatten(start), (x,)).detach()
    output_hessian = torch.autograd.functional.hessian(lambda f: loss_fn(f, y), outputs)
    j = jacobian.reshape(outputs.numel(), -1)
    return torch.einsum("ip,ij,jp->p", j, output_hessian.reshape(outputs.numel(), outputs.numel()), j)


def empirical_fisher_reference(model, x, y, loss_fn):
    """``(1/N) Σ_n (∇_θ N·loss_fn)²`` where only example n's outputs depend on θ (the others detached)."""
    start, unflatten = trainable(model)
    total = torch.zeros_like(start)
    for n in range(len(x)):

        def term(v, n=n):
            outputs = functional_call(model, unflatten(v), (x,))
            mask = torch.zeros(len(x), *[1] * (outputs.dim() - 1), dtype=outputs.dtype)
            mask[n] = 1
            return loss_fn(mask * outputs + (1 - mask) * outputs.detach(), y) * len(x)

        total += torch.autograd.functional.jacobian(term, start) ** 2
    return total / len(x)


def relu_mlp(inputs=5, classes=4, final=()):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 6), nn.ReLU(), nn.Linear(6, classes), *final).double().eval()


def data(n=10, inputs=5, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, inputs, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def hook_path_taken(model, x, rows):
    return ggn_fast.supports(model) and ggn_fast.verify(model, x[:2], lambda logits: rows) is None


# ------------------------------------------------------------------------------------------ the fast path


class TiedDecoder(nn.Module):
    """Logits ``Wᵀ relu(Wx + b)``: the encoder's weight again, through a functional call."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4)

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t())


class TimeMajor(nn.Module):
    """Batch-first data, a Linear applied to time-major activations ``[T, B, F]`` inside."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 3]
        return self.out(torch.relu(self.proj(x.transpose(0, 1))).mean(0))


def test_a_weight_used_twice_leaves_the_hook_path_and_gets_the_exact_ggn():
    torch.manual_seed(0)
    model = TiedDecoder().double().eval()
    x, y = data(8, 6, 6)
    assert ggn_fast.supports(model)  # the module types alone pass
    rows = torch.randn(2, 5, 6, dtype=torch.float64)
    assert "tied" in ggn_fast.verify(model, x[:2], lambda logits: rows)
    reference = ggn_reference(model, x, y)
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], chunk_size=3)), reference) < 1e-10


def test_a_linear_on_time_major_activations_leaves_the_hook_path():
    torch.manual_seed(0)
    model = TimeMajor().double().eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    assert not hook_path_taken(model, x, torch.randn(2, 2, 3, dtype=torch.float64))
    reference = autograd_hessian_diagonal(model, x, y)  # ReLU: the GGN is the Hessian
    for method in ("ggn", "exact"):
        assert relative_error(flat(hessian_diagonal(model, [(x, y)], method=method)), reference) < 1e-10


class ExtraHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.extra = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        self.extra(h)  # computed, not used by the logits
        return self.head(h)


@pytest.mark.parametrize("hooks", [True, False])
def test_parameters_the_logits_do_not_use_get_zero_curvature(hooks, monkeypatch):
    torch.manual_seed(0)
    model = ExtraHead().double().eval()
    x, y = data()
    if not hooks:
        monkeypatch.setattr(ggn_fast, "supports", lambda model: False)
    reference = autograd_hessian_diagonal(model, x, y)
    for method in ("ggn", "mc_ggn", "empirical_fisher", "exact", "hutchinson"):
        diag = hessian_diagonal(model, [(x, y)], method=method, num_probes=3)
        assert not diag["extra.weight"].any() and not diag["extra.bias"].any(), method
    assert relative_error(flat(hessian_diagonal(model, [(x, y)])), reference) < 1e-10


# ------------------------------------------------------------------------------------------ losses

WEIGHT = torch.tensor([0.2, 1.0, 3.0, 0.5], dtype=torch.float64)
CROSS_ENTROPIES = {
    "weight_partial": functools.partial(F.cross_entropy, weight=WEIGHT),
    "weight_module_smoothing": nn.CrossEntropyLoss(weight=WEIGHT, label_smoothing=0.1),
    "smoothing_partial": functools.partial(F.cross_entropy, label_smoothing=0.2),
    "ignore_index_module": nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=2),
}


@pytest.mark.parametrize("name", list(CROSS_ENTROPIES))
def test_weighted_and_smoothed_cross_entropy(name):
    model, (x, y) = relu_mlp(), data()
    loss_fn = CROSS_ENTROPIES[name]
    reference = autograd_hessian_diagonal(model, x, y, loss_fn)  # ReLU: GGN = Hessian
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn)), reference) < 1e-10
    fisher = flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn, method="empirical_fisher"))
    assert relative_error(fisher, empirical_fisher_reference(model, x, y, loss_fn)) < 1e-10
    sampled = hessian_diagonal(
        model, [(x, y)], loss_fn=loss_fn, method="mc_ggn", num_samples=3000, generator=torch.Generator().manual_seed(0)
    )
    assert relative_error(flat(sampled), reference) < 0.05  # unbiased, the class weights included


def test_weighted_cross_entropy_in_several_batches_is_the_size_weighted_mean_of_batch_hessians():
    model, (x, y) = relu_mlp(), data(12)
    loss_fn = CROSS_ENTROPIES["weight_partial"]
    reference = (
        autograd_hessian_diagonal(model, x[:5], y[:5], loss_fn) * 5
        + autograd_hessian_diagonal(model, x[5:], y[5:], loss_fn) * 7
    ) / 12
    for method in ("ggn", "exact"):
        diag = hessian_diagonal(model, [(x[:5], y[:5]), (x[5:], y[5:])], loss_fn=loss_fn, method=method)
        assert relative_error(flat(diag), reference) < 1e-10


def per_pixel_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1)).double().eval()


def per_token_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 3, 1)).double().eval()


@pytest.mark.parametrize("kind", ["pixel", "token", "pixel_weighted"])
def test_per_pixel_and_per_token_cross_entropy(kind, monkeypatch):
    g = torch.Generator().manual_seed(3)
    if kind.startswith("pixel"):
        model, x, y = per_pixel_model(), torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64), None
        y = torch.randint(0, 3, (4, 4, 4), generator=g)
    else:
        model, x = per_token_model(), torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (4, 5), generator=g)
    loss_fn = functools.partial(F.cross_entropy, weight=WEIGHT[:3]) if kind.endswith("weighted") else F.cross_entropy
    reference = autograd_hessian_diagonal(model, x, y, loss_fn)
    hooks = flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn, chunk_size=3))
    assert relative_error(hooks, reference) < 1e-10
    monkeypatch.setattr(ggn_fast, "supports", lambda model: False)
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn)), reference) < 1e-10
    sampled = hessian_diagonal(
        model, [(x, y)], loss_fn=loss_fn, method="mc_ggn", num_samples=4000, generator=torch.Generator().manual_seed(0)
    )
    assert relative_error(flat(sampled), reference) < 0.05  # unbiased: one label per position and sample


def test_nll_loss_on_log_softmax_is_cross_entropy_split_before_the_log_softmax():
    """Before: all zeros (nll_loss is linear in the log-probabilities). Now the GGN, which is the Hessian here."""
    model, (x, y) = relu_mlp(final=[nn.LogSoftmax(dim=1)]), data()
    reference = autograd_hessian_diagonal(model, x, y, F.nll_loss)
    assert reference.norm() > 0
    for loss_fn in (F.nll_loss, nn.NLLLoss()):
        assert relative_error(flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn)), reference) < 1e-10
    without = hessian_diagonal(relu_mlp(), [(x, y)])  # the same weights, logits and cross-entropy
    assert relative_error(flat(without), reference) < 1e-10
    weighted = nn.NLLLoss(weight=WEIGHT)
    diag = hessian_diagonal(model, [(x, y)], loss_fn=weighted)
    assert relative_error(flat(diag), autograd_hessian_diagonal(model, x, y, weighted)) < 1e-10


def test_nll_loss_on_outputs_that_are_not_log_probabilities_is_refused():
    model, (x, y) = relu_mlp(), data()
    for method in PER_EXAMPLE:
        with pytest.raises(ValueError, match="nll_loss expects log-probabilities.*log_softmax"):
            hessian_diagonal(model, [(x, y)], loss_fn=F.nll_loss, method=method)


def test_binary_cross_entropy_with_logits():
    model, (x, _) = relu_mlp(classes=3), data()
    y = (torch.rand(10, 3, generator=torch.Generator().manual_seed(4)) > 0.5).double()
    for loss_fn in (
        F.binary_cross_entropy_with_logits,
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)),
        functools.partial(F.binary_cross_entropy_with_logits, weight=torch.tensor([1.0, 0.1, 2.0]).double()),
    ):
        reference = autograd_hessian_diagonal(model, x, y, loss_fn)
        assert relative_error(flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn)), reference) < 1e-10
        fisher = flat(hessian_diagonal(model, [(x, y)], loss_fn=loss_fn, method="empirical_fisher"))
        assert relative_error(fisher, empirical_fisher_reference(model, x, y, loss_fn)) < 1e-10


def test_mean_squared_error_in_every_method():
    """Before: exact and hutchinson crashed with 'ZeroTensors are immutable'."""
    model, (x, _) = relu_mlp(classes=3), data()
    y = torch.randn(10, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = autograd_hessian_diagonal(model, x, y, F.mse_loss)
    for method in ("ggn", "exact"):
        diag = hessian_diagonal(model, [(x, y)], loss_fn=F.mse_loss, method=method)
        assert relative_error(flat(diag), reference) < 1e-10
    for method, tolerance in (("hutchinson", 0.2), ("mc_ggn", 0.1)):
        diag = hessian_diagonal(
            model, [(x, y)], loss_fn=nn.MSELoss(), method=method, num_probes=2000, num_samples=2000,
            generator=torch.Generator().manual_seed(0), chunk_size=500,
        )  # fmt: skip
        assert relative_error(flat(diag), reference) < tolerance, method


def test_any_other_loss_uses_its_output_hessian_by_autograd():
    model, (x, y) = relu_mlp(), data()

    def weighted_by_hand(logits, targets):  # class-weighted cross-entropy the loss rules cannot identify
        w = WEIGHT[targets]
        return (w * (torch.logsumexp(logits, 1) - logits.gather(1, targets[:, None])[:, 0])).sum() / w.sum()

    reference = autograd_hessian_diagonal(model, x, y, weighted_by_hand)
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], loss_fn=weighted_by_hand)), reference) < 1e-10
    with pytest.raises(ValueError, match="mc_ggn.*Use method='ggn'"):
        hessian_diagonal(model, [(x, y)], loss_fn=weighted_by_hand, method="mc_ggn")


def test_losses_without_a_gauss_newton_matrix_are_refused():
    model, (x, y) = relu_mlp(), data()
    with pytest.raises(ValueError, match="not convex in the model's outputs.*Hutchinson"):
        hessian_diagonal(model, [(x, y)], loss_fn=lambda f, t: -F.cross_entropy(f, t))
    with pytest.raises(ValueError, match="couples the examples.*Hutchinson"):
        hessian_diagonal(model, [(x, y)], loss_fn=lambda f, t: F.cross_entropy(f - f.mean(0), t))


def test_max_classes_refuses_large_output_spaces():
    model, (x, y) = relu_mlp(), data()
    with pytest.raises(ValueError, match="4 outputs per example.*max_classes=3.*MonteCarloGGN"):
        hessian_diagonal(model, [(x, y)], max_classes=3)
    estimator = GGN(max_classes=3)
    assert estimator.options()["max_classes"] == 3
    with pytest.raises(ValueError, match="MonteCarloGGN"):
        estimator.diagonal_sum(model, [(x, y)], loss_fn=F.cross_entropy, generator=torch.Generator())
    assert hessian_diagonal(model, [(x, y)], method="mc_ggn", max_classes=3)  # not the sampled one


# ------------------------------------------------------------------------------------------ models


WRAPPERS = {
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "legacy weight_norm": torch.nn.utils.weight_norm,
    "legacy spectral_norm": torch.nn.utils.spectral_norm,
}


class ManualWeightNorm(nn.Module):
    """``g · v / ‖v‖`` in plain operations; its parameters in weight norm's order (bias, g, v)."""

    def __init__(self, bias, g, v):
        super().__init__()
        self.bias, self.g, self.v = (nn.Parameter(t.detach().clone()) for t in (bias, g, v))

    def forward(self, x):
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.bias)


def plain_twin(model):
    """The same function as ``model`` (weight norm in its first layer) with the weight norm in plain operations.

    The reference for second derivatives: torch's fused weight-norm kernel has a wrong double backward
    (the saved norm is treated as a constant), so autograd's Hessian of ``model`` itself is wrong too.
    """
    layer = model[0]
    g, v = (
        (layer.parametrizations.weight.original0, layer.parametrizations.weight.original1)
        if hasattr(layer, "parametrizations")
        else (layer.weight_g, layer.weight_v)
    )
    twin = nn.Sequential(ManualWeightNorm(layer.bias, g, v), *model[1:])
    assert [p.shape for p in model.parameters()] == [p.shape for p in twin.parameters()]
    return twin


WRAPPERS = {
    "parametrizations.weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "legacy weight_norm": torch.nn.utils.weight_norm,
    "legacy spectral_norm": torch.nn.utils.spectral_norm,
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_parametrized_weights(wrapper):
    """Before: the legacy wrappers raised KeyError 'weight_g' / 'weight_orig' in the hook path, and exact and
    hutchinson inherited weight norm's wrong double backward (or failed: no forward-mode derivative)."""
    torch.manual_seed(0)
    model = nn.Sequential(WRAPPERS[wrapper](nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    x, y = data()
    assert not ggn_fast.supports(model)
    for method in ("ggn", "empirical_fisher"):  # per-example products, first derivatives only
        diag = flat(hessian_diagonal(model, [(x, y)], method=method))
        reference = (
            ggn_reference(model, x, y) if method == "ggn" else empirical_fisher_reference(model, x, y, F.cross_entropy)
        )
        assert relative_error(diag, reference) < 1e-10, method
    reference = autograd_hessian_diagonal(plain_twin(model) if "weight_norm" in wrapper else model, x, y)
    exact = flat(hessian_diagonal(model, [(x, y)], method="exact"))
    assert relative_error(exact, reference) < 1e-10
    if "weight_norm" in wrapper:
        options = dict(method="hutchinson", num_probes=5)
        estimate = hessian_diagonal(model, [(x, y)], generator=torch.Generator().manual_seed(1), **options)
        twin = hessian_diagonal(plain_twin(model), [(x, y)], generator=torch.Generator().manual_seed(1), **options)
        assert relative_error(flat(estimate), flat(twin)) < 1e-10


class _SoftplusFunction(torch.autograd.Function):
    """A user's own operation: a backward that autograd can differentiate again, no forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


class CustomSoftplus(nn.Module):
    def forward(self, x):
        return _SoftplusFunction.apply(x)


def test_operations_without_forward_mode_fall_back_to_double_backward_and_a_loop(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), CustomSoftplus(), nn.Linear(6, 4)).double().eval()
    twin = nn.Sequential(model[0], nn.Softplus(), model[2])
    x, y = data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="setup_context"):  # torch.func cannot run it: no jvp, no vmap
        torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), (params,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    options = dict(method="hutchinson", num_probes=6, chunk_size=4)
    fallback = hessian_diagonal(model, batches, generator=torch.Generator().manual_seed(1), **options)
    forward = hessian_diagonal(twin, batches, generator=torch.Generator().manual_seed(1), **options)
    assert relative_error(flat(fallback), flat(forward)) < 1e-10
    exact = flat(hessian_diagonal(model, batches, method="exact"))
    assert relative_error(exact, autograd_hessian_diagonal(twin, x, y)) < 1e-10
    for hooks in (True, False):  # without hooks, vmap cannot run it either: a loop over examples
        ggn = flat(hessian_diagonal(model, batches, method="ggn"))
        assert relative_error(ggn, ggn_reference(twin, x, y)) < 1e-10
        monkeypatch.setattr(ggn_fast, "supports", lambda model: False)


def test_hutchinson_refuses_operations_with_no_second_derivative():
    model = nn.Sequential(nn.Linear(5, 6), nn.Hardsigmoid(), nn.Linear(6, 4)).double()
    x, y = data()
    for method in ("hutchinson", "exact"):
        with pytest.raises(ValueError, match="Hessian-vector products are not available.*hardsigmoid.*GGN"):
            hessian_diagonal(model, [(x, y)], method=method, num_probes=2)
    reference = ggn_reference(model, x, y)  # piecewise linear: the GGN is the Hessian
    assert relative_error(flat(hessian_diagonal(model, [(x, y)])), reference) < 1e-10


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.out = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.lstm(x)[0][:, -1])


def test_lstm_in_float64_loops_over_examples_where_vmap_cannot_run_it():
    torch.manual_seed(0)
    model = LSTMClassifier().double().eval()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    reference = ggn_reference(model, x, y)
    assert relative_error(flat(hessian_diagonal(model, [(x, y)], chunk_size=2)), reference) < 1e-10
    fisher = flat(hessian_diagonal(model, [(x, y)], method="empirical_fisher"))
    assert relative_error(fisher, empirical_fisher_reference(model, x, y, F.cross_entropy)) < 1e-10
    # float32 runs oneDNN's LSTM, which has no forward-mode derivative: double backward, same probes
    single = LSTMClassifier().eval()
    single.load_state_dict(model.state_dict())
    options = dict(method="hutchinson", num_probes=4)
    estimate = hessian_diagonal(single, [(x.float(), y)], generator=torch.Generator().manual_seed(2), **options)
    reference = hessian_diagonal(model, [(x, y)], generator=torch.Generator().manual_seed(2), **options)
    assert relative_error(flat(estimate).double(), flat(reference)) < 1e-4


class BatchCentred(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


@pytest.mark.parametrize("mixing", ["batchnorm", "custom"])
def test_models_that_mix_the_examples_of_a_batch_are_refused_by_the_per_example_methods(mixing):
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(6, track_running_stats=False) if mixing == "batchnorm" else BatchCentred()
    model = nn.Sequential(nn.Linear(5, 6), layer, nn.ReLU(), nn.Linear(6, 4)).double().eval()
    x, y = data()
    message = "track_running_stats=False.*Hutchinson" if mixing == "batchnorm" else "depends on the other examples"
    for method in PER_EXAMPLE:
        with pytest.raises(ValueError, match=message):
            hessian_diagonal(model, [(x, y)], method=method)
    exact = flat(hessian_diagonal(model, [(x, y)], method="exact"))  # the batch's own loss
    assert relative_error(exact, autograd_hessian_diagonal(model, x, y)) < 1e-10


# ------------------------------------------------------------------------------------------ the report


class SmoothClassifier(ImageClassifier):
    def __init__(self, activation):
        super().__init__(num_classes=3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), activation, nn.Linear(8, 3))


@pytest.mark.parametrize(
    "estimator", [GGN(samples=40), MonteCarloGGN(samples=40), Hutchinson(samples=40, num_probes=2)]
)
def test_smooth_nonlinearities_are_named_in_a_warning_and_the_report(estimator, tmp_path):
    from conftest import TensorDataModule

    datamodule = TensorDataModule(n=60, num_forget=8)
    callback = SharpnessAwareUnlearning(curvature=estimator, update=FirstOrder(0.0), verbose=False)
    if estimator.method == "hutchinson":
        report = callback.unlearn(SmoothClassifier(nn.GELU()), datamodule)
        assert report.curvature_notes == []
    else:
        with pytest.warns(UserWarning, match="Gauss-Newton part.*GELU.*Hutchinson"):
            report = callback.unlearn(SmoothClassifier(nn.GELU()), datamodule)
        assert len(report.curvature_notes) == 1 and "Hutchinson" in report.curvature_notes[0]
        assert "F.gelu" in report.curvature_notes[0]  # functional calls are not seen
        report.to_json(tmp_path / "report.json")
        assert UnlearningReport.from_json(tmp_path / "report.json").curvature_notes == report.curvature_notes
    relu = callback.unlearn(SmoothClassifier(nn.ReLU()), datamodule)
    assert relu.curvature_notes == []
    old = relu.to_dict()
    del old["curvature_notes"]  # JSON written before the field existed
    assert UnlearningReport.from_dict(old).curvature_notes == []
