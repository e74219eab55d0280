"""IteratedFirstOrder against hand loops: the closed form taken again at the new weights, stopped by validation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, TinyClassifier, assert_same_state, state

from lightning_sa_unlearn import FirstOrder, FixedStep, IteratedFirstOrder, SharpnessAwareUnlearning, ValidatedStep

NAMES = ["net.fc2.weight", "net.fc2.bias"]


def float64_model():
    torch.manual_seed(1)
    model = TinyClassifier().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def forget_loss_by_hand(model, datamodule):
    """Σ_{D̃_f} ℓ(x, y_true) − Σ_{D_f} ℓ(x, y_poisoned) (paper eq. 7, sum reduction)."""
    n = datamodule.num_forget
    x = datamodule.x[:n].double()
    return F.cross_entropy(model(x), datamodule.y[:n], reduction="sum") - F.cross_entropy(
        model(x), datamodule.poisoned[:n], reduction="sum"
    )


def forget_gradient_by_hand(model, datamodule):
    """∇ of :func:`forget_loss_by_hand` for the last layer."""
    loss = forget_loss_by_hand(model, datamodule)
    params = dict(model.named_parameters())
    return dict(zip(NAMES, torch.autograd.grad(loss, [params[n] for n in NAMES])))


def unlearn(model, datamodule, update):
    return SharpnessAwareUnlearning(selection=["net.fc2"], update=update, harm_guard=False, verbose=False).unlearn(
        model, datamodule
    )


def test_the_first_step_is_the_closed_form_and_fixed_steps_follow_a_hand_loop():
    datamodule, tau = TensorDataModule(), 0.003
    one, first_order = float64_model(), float64_model()
    unlearn(one, datamodule, IteratedFirstOrder(max_steps=1, step_size=FixedStep(tau)))
    unlearn(first_order, datamodule, FirstOrder(FixedStep(tau)))
    assert_same_state(one, state(first_order))

    model, by_hand = float64_model(), float64_model()
    before = state(model)
    report = unlearn(model, datamodule, IteratedFirstOrder(max_steps=3, step_size=FixedStep(tau)))
    params = dict(by_hand.named_parameters())
    for _ in range(3):
        gradient = forget_gradient_by_hand(by_hand, datamodule)
        with torch.no_grad():
            for name in NAMES:
                params[name].sub_(tau * gradient[name])
    for name in NAMES:
        torch.testing.assert_close(dict(model.named_parameters())[name], params[name], rtol=1e-10, atol=1e-12)
    assert_same_state(model, before, except_names=set(NAMES))
    assert report.update_steps == 3 and report.update_details == {"taus": [tau, tau, tau]}


def test_it_stops_where_a_hand_loop_over_the_same_validation_values_keeps_tau_zero():
    datamodule, grid, max_steps = TensorDataModule(), [0.0, 0.0003, 0.003, 0.03], 6
    model, by_hand = float64_model(), float64_model()
    report = unlearn(model, datamodule, IteratedFirstOrder(max_steps, ValidatedStep(search="grid", grid=grid)))
    x_val, y_val = datamodule.val[0].double(), datamodule.val[1]
    params, taus = dict(by_hand.named_parameters()), []
    for _ in range(max_steps):
        gradient = forget_gradient_by_hand(by_hand, datamodule)
        start = {name: params[name].detach().clone() for name in NAMES}
        losses = {}
        with torch.no_grad():
            for t in grid:
                for name in NAMES:
                    params[name].copy_(start[name] - t * gradient[name])
                losses[t] = F.cross_entropy(by_hand(x_val), y_val).item()
            best = min(grid, key=lambda t: (losses[t], t))
            for name in NAMES:
                params[name].copy_(start[name] - best * gradient[name])
        taus.append(best)
        if best == 0:
            break
    assert report.update_details["taus"] == taus and len(taus) > 1  # it took steps, then stopped (or ran out)
    assert report.update_steps == sum(t > 0 for t in taus)
    for name in NAMES:
        torch.testing.assert_close(dict(model.named_parameters())[name], params[name], rtol=1e-9, atol=1e-12)


def test_max_steps_is_checked():
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        IteratedFirstOrder(max_steps=0)


@pytest.mark.parametrize("lr, best", [(2.0, 1), (20.0, 0)])  # overshooting after epoch 1; worse from the start
def test_fine_tune_ends_at_the_epoch_a_hand_computation_of_the_validation_loss_picks(monkeypatch, lr, best):
    """FineTune(best_epoch=True): the objective after each epoch (epoch 0: before) is the validation loss computed
    by hand at the same weights, and the weights end at the least one."""
    from lightning_sa_unlearn import FineTune
    from lightning_sa_unlearn.updates import gradient_steps

    datamodule, model = TensorDataModule(), float64_model()
    x_val, y_val = datamodule.val[0].double(), datamodule.val[1]
    params = dict(model.named_parameters())
    trajectory = [{n: params[n].detach().clone() for n in NAMES}]
    original = gradient_steps.fine_tune

    def spy(*args, after_epoch=None, **kwargs):
        def record(epoch):
            trajectory.append({n: params[n].detach().clone() for n in NAMES})
            after_epoch(epoch)

        return original(*args, after_epoch=record, **kwargs)

    monkeypatch.setattr(gradient_steps, "fine_tune", spy)
    update = FineTune(epochs=4, lr=lr, momentum=0.9, best_epoch=True)
    report = unlearn(model, datamodule, update)
    by_hand = []
    probe = float64_model()
    probe_params = dict(probe.named_parameters())
    with torch.no_grad():
        for weights in trajectory:
            for name in NAMES:
                probe_params[name].copy_(weights[name])
            by_hand.append(F.cross_entropy(probe(x_val), y_val).item())
    details = report.update_details
    assert details["epoch_objectives"] == pytest.approx(by_hand, rel=1e-9) and len(by_hand) == 5
    assert min(range(len(by_hand)), key=by_hand.__getitem__) == details["best_epoch"] == best
    for name in NAMES:
        assert torch.equal(params[name], trajectory[best][name])


def test_a_list_of_lrs_keeps_the_trial_that_separate_runs_of_each_lr_say_is_best():
    """Each trial equals a separate FineTune(best_epoch=True) of that lr (the later trials on the first one's stored
    features), and the search keeps the one of least validation objective."""
    from lightning_sa_unlearn import FineTune

    lrs, datamodule = [0.05, 2.0, 20.0], TensorDataModule()
    search_model = float64_model()
    report = unlearn(search_model, datamodule, FineTune(epochs=3, lr=lrs))
    separate = {}
    for lr in lrs:
        model = float64_model()
        details = unlearn(model, datamodule, FineTune(epochs=3, lr=lr, best_epoch=True)).update_details
        separate[lr] = (min(details["epoch_objectives"]), details["best_epoch"], state(model))
    trials = report.update_details["lr_search"]
    assert [t["lr"] for t in trials] == lrs
    for trial in trials:
        objective, best_epoch, _ = separate[trial["lr"]]
        assert trial["objective"] == pytest.approx(objective, rel=1e-12) and trial["best_epoch"] == best_epoch
    chosen = min(lrs, key=lambda lr: separate[lr][0])
    assert report.update_details["lr"] == chosen == 2.0
    assert_same_state(search_model, separate[chosen][2])


def test_an_lr_that_diverges_midway_is_one_lost_trial_not_a_failed_run(monkeypatch):
    """The first lr's loss turns NaN on its 3rd batch (inside the first epoch, while features are being stored):
    that trial keeps its epoch 0 and says it diverged, and the next lr trains as a separate run of it alone."""
    from lightning_sa_unlearn import FineTune
    from lightning_sa_unlearn.updates import gradient_steps

    original, bad = gradient_steps.fine_tune, 0.7

    def spy(*args, lr, loss_fn, **kwargs):
        calls = []

        def failing(logits, y):
            calls.append(1)
            return loss_fn(logits, y) * (math.nan if len(calls) == 3 else 1.0)

        return original(*args, lr=lr, loss_fn=failing if lr == bad else loss_fn, **kwargs)

    monkeypatch.setattr(gradient_steps, "fine_tune", spy)
    datamodule, search_model, alone = TensorDataModule(), float64_model(), float64_model()
    report = unlearn(search_model, datamodule, FineTune(epochs=3, lr=[bad, 0.05]))
    expected = unlearn(alone, datamodule, FineTune(epochs=3, lr=0.05, best_epoch=True))
    trials = report.update_details["lr_search"]
    assert trials[0]["diverged"] and trials[0]["best_epoch"] == 0 and not trials[1]["diverged"]
    assert trials[1]["objective"] == pytest.approx(min(expected.update_details["epoch_objectives"]), rel=1e-12)
    assert report.update_details["lr"] == 0.05 and report.update_details["cached_below"] is not None
    assert_same_state(search_model, state(alone))
    with pytest.raises(FloatingPointError, match="not finite"):  # one lr: nothing to fall back on
        unlearn(float64_model(), datamodule, FineTune(epochs=3, lr=bad, best_epoch=True))
