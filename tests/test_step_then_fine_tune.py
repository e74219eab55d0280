"""StepThenFineTune against hand computations: its first step is the closed form (eq. 7), its fine-tune starts there
and stops where a hand loop over the same validation losses stops, and its stored-feature path equals the whole
model's. Two processes against one: tests/test_distributed.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, assert_same_state, state
from test_iterated import NAMES, float64_model, forget_gradient_by_hand, unlearn

from lightning_sa_unlearn import FineTune, FirstOrder, FixedStep, SharpnessAwareUnlearning, StepThenFineTune
from lightning_sa_unlearn.updates import gradient_steps


def closed_form_by_hand(datamodule, tau):
    model = float64_model()
    gradient = forget_gradient_by_hand(model, datamodule)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in NAMES:
            params[name].sub_(tau * gradient[name])
    return {name: params[name].detach().clone() for name in NAMES}


def record_epochs(monkeypatch, model):
    """The selected weights where the fine-tune starts and after each of its epochs."""
    params, trajectory = dict(model.named_parameters()), []
    original = gradient_steps.fine_tune

    def spy(*args, after_epoch=None, **kwargs):
        trajectory.append({n: params[n].detach().clone() for n in NAMES})

        def record(epoch):
            trajectory.append({n: params[n].detach().clone() for n in NAMES})
            after_epoch(epoch)

        return original(*args, after_epoch=record, **kwargs)

    monkeypatch.setattr(gradient_steps, "fine_tune", spy)
    return trajectory


def test_the_first_step_is_the_closed_form_and_a_fine_tune_that_only_hurts_keeps_it():
    datamodule, tau = TensorDataModule(), 0.003
    model = float64_model()
    update = StepThenFineTune(FirstOrder(FixedStep(tau)), FineTune(epochs=2, lr=500.0, best_epoch=True))
    report = unlearn(model, datamodule, update)
    expected = closed_form_by_hand(datamodule, tau)
    for name in NAMES:
        torch.testing.assert_close(dict(model.named_parameters())[name], expected[name], rtol=1e-10, atol=1e-12)
    assert report.update_details["best_epoch"] == 0 and report.update_details["step"]["tau"] == tau
    assert report.tau == tau


def test_the_fine_tune_starts_at_the_step_and_ends_where_a_hand_loop_over_validation_losses_ends(monkeypatch):
    datamodule, tau = TensorDataModule(), 0.003
    model = float64_model()
    trajectory = record_epochs(monkeypatch, model)
    update = StepThenFineTune(FirstOrder(FixedStep(tau)), FineTune(epochs=4, lr=2.0, best_epoch=True))
    report = unlearn(model, datamodule, update)
    start = closed_form_by_hand(datamodule, tau)
    for name in NAMES:
        torch.testing.assert_close(trajectory[0][name], start[name], rtol=1e-10, atol=1e-12)
    x_val, y_val = datamodule.val[0].double(), datamodule.val[1]
    probe = float64_model()
    probe_params, by_hand = dict(probe.named_parameters()), []
    with torch.no_grad():
        for weights in trajectory:
            for name in NAMES:
                probe_params[name].copy_(weights[name])
            by_hand.append(F.cross_entropy(probe(x_val), y_val).item())
    best = min(range(len(by_hand)), key=by_hand.__getitem__)
    details = report.update_details
    assert len(by_hand) == 5 and details["epoch_objectives"] == pytest.approx(by_hand, rel=1e-9)
    assert details["best_epoch"] == best > 0  # the fine-tune went beyond the step
    for name in NAMES:
        assert torch.equal(dict(model.named_parameters())[name], trajectory[best][name])


def test_a_zero_step_leaves_the_plain_fine_tune():
    datamodule, fine_tune = TensorDataModule(), dict(epochs=3, lr=[0.05, 2.0], best_epoch=True)
    combined, alone = float64_model(), float64_model()
    report = unlearn(combined, datamodule, StepThenFineTune(FirstOrder(FixedStep(0.0)), FineTune(**fine_tune)))
    expected = unlearn(alone, datamodule, FineTune(**fine_tune))
    assert_same_state(combined, state(alone))
    assert report.update_details["lr_search"] == expected.update_details["lr_search"]


def test_the_stored_feature_path_equals_the_whole_model(tiny_model):
    trained, datamodule = tiny_model
    weights = []
    for cache in (True, False):
        model = type(trained)()
        model.load_state_dict(trained.state_dict())
        update = StepThenFineTune(FirstOrder(FixedStep(0.01)), FineTune(epochs=3, lr=[0.05, 0.2], cache_features=cache))
        report = SharpnessAwareUnlearning(selection="last", update=update, harm_guard=False, verbose=False).unlearn(
            model, datamodule
        )
        assert (report.update_details["cached_below"] is not None) is cache
        weights.append(state(model))
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_without_a_retain_set_it_applies_the_step_and_says_the_fine_tune_did_not_run():
    datamodule, tau = TensorDataModule(with_retain=False), 0.003
    model = float64_model()
    update = StepThenFineTune(FirstOrder(FixedStep(tau)))
    with pytest.warns(UserWarning, match="retain_dataloader"):
        report = unlearn(model, datamodule, update)
    expected = closed_form_by_hand(datamodule, tau)
    for name in NAMES:
        torch.testing.assert_close(dict(model.named_parameters())[name], expected[name], rtol=1e-10, atol=1e-12)
    assert "did not run" in report.fallback


def test_the_parts_must_read_one_validation_objective():
    with pytest.raises(ValueError, match="same validation objective"):
        StepThenFineTune(fine_tune=FineTune(best_epoch=True, objective="validation_and_forget"))
    with pytest.raises(ValueError, match="needs a FineTune instance"):
        StepThenFineTune(fine_tune=FirstOrder())
