"""Backdoor scenario, attack success rate, membership inference and the relearning attack."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, assert_same_state, state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_sa_unlearn.evaluations.relearn as relearn_module
from lightning_sa_unlearn import (
    GGN,
    HeldOutMetrics,
    MembershipInference,
    RelearnAttack,
    SharpnessAwareUnlearning,
    UnlearningReport,
)
from lightning_sa_unlearn.datamodules import PoisonedLabelDataModule
from lightning_sa_unlearn.evaluations import attack_success_rate
from lightning_sa_unlearn.evaluations.membership import fit_logistic_regression, membership_inference, roc_auc
from lightning_sa_unlearn.evaluations.relearn import first_samples, relearn_attack


def identity_model(num_classes: int = 4) -> nn.Module:
    """Logits equal to the input vector: what a test feeds in is what the model predicts."""
    model = nn.Linear(num_classes, num_classes, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(num_classes))
    return model


def loader(x, y, batch_size=7):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def test_attack_success_rate_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    predicted = torch.tensor([3, 0, 3, 1, 3, 3, 3, 0, 1, 2])
    # six samples are not of the target class 3; four of them are predicted 3. Class-3 samples do not count.
    rate = attack_success_rate(identity_model(), loader(F.one_hot(predicted, 4).float(), labels), 3, 4)
    assert rate == pytest.approx(4 / 6)


def test_roc_auc_by_hand():
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs are ordered
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == pytest.approx(0.5)  # a tie counts one half


def test_logistic_regression_reaches_the_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    y = (x @ torch.tensor([2.0, -1.0], dtype=torch.float64) + 0.3 + torch.randn(400, generator=g) > 0).double()
    w = fit_logistic_regression(x, y, l2=1e-3).requires_grad_(True)
    design = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], dim=1)
    objective = F.binary_cross_entropy_with_logits(design @ w, y) + 0.5e-3 * w[:-1].square().sum()
    (gradient,) = torch.autograd.grad(objective, w)
    assert gradient.abs().max() < 1e-6


def membership_data(member_scale: float, forget_scale: float, n: int = 1200, seed: int = 0):
    """Inputs are logits: members (retain) get a margin of ``member_scale`` on their label, test samples none."""
    g = torch.Generator().manual_seed(seed)

    def samples(scale):
        y = torch.randint(0, 4, (n,), generator=g)
        return loader(torch.randn(n, 4, generator=g) + scale * F.one_hot(y, 4), y, batch_size=100)

    return samples(member_scale), samples(0.0), samples(forget_scale)


def test_membership_inference_without_signal_is_a_coin_flip():
    retain, test, forget = membership_data(member_scale=0.0, forget_scale=0.0)
    result = membership_inference(identity_model(), retain, test, forget)
    assert abs(result["attacker_auc"] - 0.5) < 0.06
    assert abs(result["forget_non_member_rate"] - 0.5) < 0.06


def test_membership_inference_separates_members_from_non_members():
    model = identity_model()
    retain, test, remembered = membership_data(member_scale=4.0, forget_scale=4.0)
    strong = membership_inference(model, retain, test, remembered)
    assert strong["attacker_auc"] > 0.95 and strong["forget_non_member_rate"] < 0.1
    retain, test, forgotten = membership_data(member_scale=4.0, forget_scale=0.0)
    assert membership_inference(model, retain, test, forgotten)["forget_non_member_rate"] > 0.85


def test_relearn_attack_is_one_sgd_step_on_a_copy():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3)
    before = state(model)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    attacked = relearn_attack(model, (x, y), steps=1, lr=0.1, batch_size=8)
    assert_same_state(model, before)  # the caller's model is untouched
    reference = nn.Linear(5, 3)
    reference.load_state_dict(before)
    loss = F.cross_entropy(reference(x), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, p0, grad in zip(attacked.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, p0 - 0.1 * grad)


def test_relearn_attack_in_a_run_trains_what_the_user_had_trainable(tiny_model, monkeypatch):
    """The update freezes all but the selected layer; the attack after it must not inherit that freeze."""
    model, datamodule = tiny_model
    model.net.conv.bias.requires_grad_(False)  # frozen by the user: the attack leaves it too
    seen = {}

    def spy(attacked_model, *args, **kwargs):
        seen["flags"] = {n: p.requires_grad for n, p in attacked_model.named_parameters()}
        seen["before"] = {n: p.detach().clone() for n, p in attacked_model.named_parameters()}
        seen["copy"] = relearn_attack(attacked_model, *args, **kwargs)
        return seen["copy"]

    monkeypatch.setattr(relearn_module, "relearn_attack", spy)
    evaluation = RelearnAttack(samples=20, steps=3, lr=0.01)
    report = SharpnessAwareUnlearning(verbose=False, selection="last", evaluations=[evaluation]).unlearn(
        model, datamodule
    )
    assert report.selected_layers == ["net.fc2"] and report.relearn["steps"] == 3
    assert seen["flags"] == {n: n != "net.conv.bias" for n, _ in model.named_parameters()}
    moved = {n for n, p in seen["copy"].named_parameters() if not torch.equal(p, seen["before"][n])}
    assert moved == {n for n, _ in model.named_parameters()} - {"net.conv.bias"}  # outside the selection too
    assert not model.net.conv.bias.requires_grad and model.net.fc1.weight.requires_grad  # flags as the user set


def test_relearn_attack_needs_a_trainable_parameter():
    model = nn.Linear(5, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameter"):
        relearn_attack(model, (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)))


def test_first_samples_takes_the_first_n():
    x, y = first_samples(loader(torch.arange(20.0)[:, None], torch.arange(20)), 10)
    assert torch.equal(y, torch.arange(10)) and x.shape == (10, 1)


def backdoor(**kwargs):
    options = dict(dataset="synthetic", poison="backdoor", num_poisoned=60, target_class=0, seed=0)
    dm = PoisonedLabelDataModule(**{**options, **kwargs})
    dm.setup()
    return dm


def test_backdoor_stamps_the_trigger_and_relabels_to_the_target():
    dm = backdoor(trigger_size=4)
    x_f, y_f = dm.forget_set.tensors
    x_c, y_c = dm.corrected_set.tensors
    white = dm.train_set.tensors[0].amax()
    assert (y_f == 0).all() and (y_c != 0).all()
    assert (x_f[..., -4:, -4:] == white).all()  # the trigger is on the trained copy
    assert torch.equal(x_f[..., :-4, :], x_c[..., :-4, :])  # nothing else differs from D̃_f
    triggered_x, triggered_y = next(iter(dm.triggered_test_dataloader()))
    assert (triggered_y != 0).all() and (triggered_x[..., -4:, -4:] == white).all()
    top_left = backdoor(trigger_size=4, trigger_corner="top_left").forget_set.tensors[0]
    assert (top_left[..., :4, :4] == white).all() and torch.equal(top_left[..., 4:, :], x_c[..., 4:, :])
    corrected = backdoor(train_labels="corrected")
    assert (corrected.train_set.tensors[0][..., -4:, -4:] != white).any(dim=(1, 2, 3)).all()


def test_deletion_has_no_corrected_set_and_retrains_on_the_retain_set():
    dm = backdoor(poison="deletion", train_labels="corrected")
    assert dm.corrected_dataloader() is None and dm.target_class is None
    assert torch.equal(dm.train_set.tensors[1], dm.retain_set.tensors[1])
    assert len(dm.train_set) + len(dm.forget_set) == 1080


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(trigger_size=29), "trigger_size=29 is larger than the 28×28 images"),
        (dict(trigger_size=0), "trigger_size must be >= 1"),
        (dict(target_class=10), "target_class=10 is outside"),
        (dict(flip_to=3), "flip_to applies to label flips only"),
        (dict(trigger_corner="center"), "trigger_corner must be"),
    ],
)
def test_bad_backdoor_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backdoor(**kwargs)


class TriggeredDataModule(TensorDataModule):
    """The tiny task with a 'triggered' test loader whose samples are all pushed towards class 2."""

    target_class = 2

    def triggered_test_dataloader(self):
        x, y = self.test
        keep = y != self.target_class
        return self._loader(x[keep] + 0.5, y[keep])


def test_evaluations_are_reported_and_change_nothing(tiny_model):
    model, _ = tiny_model
    start = state(model)
    plain = SharpnessAwareUnlearning(verbose=False, seed=3).unlearn(model, TriggeredDataModule())
    unlearned = state(model)
    model.load_state_dict({k: v for k, v in start.items()}, strict=False)
    callback = SharpnessAwareUnlearning(verbose=False, seed=3, evaluations=["mia", RelearnAttack(samples=20)])
    report = callback.unlearn(model, TriggeredDataModule())
    assert_same_state(model, unlearned)  # evaluating does not alter the unlearned weights
    assert report.tau == plain.tau and report.heldout_after == plain.heldout_after
    datamodule = TriggeredDataModule()
    expected = attack_success_rate(model, datamodule.triggered_test_dataloader(), 2, 3)
    assert report.heldout_after["attack_success_rate"] == pytest.approx(expected)
    assert set(report.membership_inference) == {"before", "after"}
    assert 0 <= report.membership_inference["after"]["forget_non_member_rate"] <= 1
    assert report.relearn["samples"] == 20 and "attack_success_rate" in report.relearn["heldout"]
    assert "unlearn/relearn/heldout/accuracy" in report.scalar_metrics()
    assert "attack success rate" in report.format_table()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(evaluations=["bogus"]), "evaluations='bogus' is not an Evaluation"),
        (dict(evaluations="mia"), "evaluations takes a list"),
        (dict(evaluations=["mia", MembershipInference()]), "more than once"),
    ],
)
def test_bad_evaluation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharpnessAwareUnlearning(**kwargs)


def test_mia_without_retain_set_is_refused_and_leaves_the_model(tiny_model):
    model, _ = tiny_model
    before = state(model)
    with pytest.raises(ValueError, match="needs retain_dataloader"):
        SharpnessAwareUnlearning(verbose=False, evaluations=["mia"]).unlearn(model, TensorDataModule(with_retain=False))
    assert_same_state(model, before)


def test_report_with_evaluations_round_trips_through_json(tiny_model, tmp_path):
    model, _ = tiny_model
    callback = SharpnessAwareUnlearning(verbose=False, evaluations=["mia", RelearnAttack(samples=20)])
    report = callback.unlearn(model, TriggeredDataModule())
    report.to_json(tmp_path / "report.json")
    loaded = UnlearningReport.from_json(tmp_path / "report.json")
    original, reread = report.scalar_metrics(), loaded.scalar_metrics()
    assert original.keys() == reread.keys()
    for key, value in original.items():
        assert value == pytest.approx(reread[key], nan_ok=True), key
    assert loaded.format_table() == report.format_table()
    assert loaded.selection_margin == pytest.approx(report.selection_margin)


def test_roc_auc_from_ranks_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    labels = torch.randint(0, 2, (300,), generator=g)
    positive, negative = scores[labels.bool()], scores[~labels.bool()]
    pairwise = (positive[:, None] > negative[None, :]).double().mean() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).double().mean()
    assert roc_auc(scores, labels) == pytest.approx(float(pairwise), rel=1e-12)


def test_one_curvature_batch_reports_no_error_estimate_and_round_trips(tiny_model, tmp_path):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection="flattest", verbose=False, curvature=GGN(samples=16)).unlearn(
        model, datamodule
    )
    assert math.isnan(report.selection_margin["lead_in_standard_errors"])
    report.to_json(tmp_path / "report.json")
    loaded = UnlearningReport.from_json(tmp_path / "report.json")
    assert "no error estimate (one batch)" in loaded.format_table()


def test_evaluations_apply_to_any_model_and_datamodule(tiny_model):
    model, _ = tiny_model
    datamodule = TriggeredDataModule()
    before = state(model)
    measured = HeldOutMetrics()(model, datamodule)
    x, y = datamodule.test
    xt, yt = next(iter(datamodule.triggered_test_dataloader()))
    model.eval()
    with torch.no_grad():  # independent of torchmetrics: plain argmax counts
        accuracy = (model(x).argmax(-1) == y).double().mean().item()
        loss = F.cross_entropy(model(x), y).item()
        success = (model(xt).argmax(-1) == 2).double().mean().item()  # the loader keeps non-target samples only
        n = datamodule.num_forget
        forget = (model(datamodule.x[:n]).argmax(-1) == datamodule.poisoned[:n]).double().mean().item()
    assert measured["heldout"]["accuracy"] == pytest.approx(accuracy)
    assert measured["heldout"]["loss"] == pytest.approx(loss, rel=1e-6)
    assert measured["heldout"]["attack_success_rate"] == pytest.approx(success)
    assert measured["forget"]["accuracy_trained_labels"] == pytest.approx(forget)
    mia = MembershipInference(samples=200)(model, datamodule, seed=1)
    n = datamodule.num_forget  # the evaluation reads every loader in index order, whatever its sampler
    retain, test = datamodule._loader(datamodule.x[n:], datamodule.y[n:]), datamodule.test_dataloader()
    assert mia == membership_inference(model, retain, test, datamodule.forget_dataloader(), max_samples=200, seed=1)
    relearned = RelearnAttack(samples=20, steps=3, lr=0.01)(model, datamodule)
    assert relearned["samples"] == 20 and relearned["steps"] == 3
    assert_same_state(model, before)  # the attack works on a copy
