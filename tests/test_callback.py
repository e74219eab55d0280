"""SharpnessAwareUnlearning: end to end, its guarantees, and its errors on bad input."""

import importlib.util
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, TinyClassifier, assert_same_state, fit_tiny, quiet_trainer, state
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import lightning_sa_unlearn
from lightning_sa_unlearn import (
    FineTune,
    FirstOrder,
    SharpnessAwareUnlearning,
    ValidatedStep,
    hessian_diagonal,
    layer_sharpness,
)
from lightning_sa_unlearn.functional import eval_mode
from lightning_sa_unlearn.report import UnlearningReport

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["net.conv", "net.bn", "net.fc1", "net.fc2"]


def independent_forget_gradient(model, datamodule, loss=None):
    """Σ_i ∇[ℓ(x_i, ỹ_i) − ℓ(x_i, y_i)] over the forget set, sample by sample, in eval mode."""
    loss = loss or (lambda logits, wrong, right: F.cross_entropy(logits, right) - F.cross_entropy(logits, wrong))
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n = datamodule.num_forget
    x, wrong, right = datamodule.x[:n], datamodule.poisoned[:n], datamodule.y[:n]
    for i in range(n):
        grads = torch.autograd.grad(
            loss(model(x[i : i + 1]), wrong[i : i + 1], right[i : i + 1]), list(params.values())
        )
        for name, g in zip(params, grads):
            total[name] += g
    return total


def test_fit_then_unlearn_end_to_end(tmp_path):
    callback = SharpnessAwareUnlearning(  # the paper's method (the defaults until 0.3): flattest, first order
        selection="flattest",
        update="first_order",
        report_path=str(tmp_path / "report.json"),
        plot_path=str(tmp_path / "sharpness.png"),
        verbose=False,
    )
    datamodule = TensorDataModule()
    trainer = quiet_trainer(max_epochs=3, callbacks=[callback], logger=CSVLogger(tmp_path))
    model = TinyClassifier()
    trainer.fit(model, datamodule)
    report = callback.report

    assert list(report.layer_sharpness) == LAYERS
    assert all(value > 0 for value in report.layer_sharpness.values())
    flattest = min(report.layer_sharpness, key=report.layer_sharpness.get)
    assert report.selected_layers == [flattest]
    module = dict(model.named_modules())[flattest]
    assert report.num_updated_parameters == sum(p.numel() for p in module.parameters())
    assert report.tau in [tau for tau, _ in report.tau_search] and report.tau_search[0][0] == 0.0
    # 240 training samples: a sequential pass reads at most a quarter, raised to its 8 batches of 16
    assert report.curvature_samples == 128 and report.validation_source == "val_dataloader"
    for metrics in (report.heldout_before, report.heldout_after):
        assert {"accuracy", "loss", "accuracy_class_0", "accuracy_class_1", "accuracy_class_2"} <= metrics.keys()
    for metrics in (report.forget_before, report.forget_after):
        assert metrics.keys() == {"accuracy_trained_labels", "accuracy_corrected_labels"}
    assert {"curvature", "update", "evaluation", "total"} <= report.seconds.keys()

    # The held-out accuracy is recomputed here, independently of torchmetrics.
    x, y = datamodule.test
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).double().mean().item()
    assert report.heldout_after["accuracy"] == pytest.approx(accuracy)

    assert trainer.callback_metrics["unlearn/heldout_after/accuracy"].item() == pytest.approx(accuracy)
    assert json.loads((tmp_path / "report.json").read_text())["selected_layers"] == [flattest]
    assert (tmp_path / "sharpness.png").stat().st_size > 1000
    logged = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "unlearn/heldout_after/accuracy" in logged


def test_first_order_changes_only_the_selected_layer(tiny_model):
    model, datamodule = tiny_model
    model.train()
    model.net.fc2.bias.requires_grad_(False)  # a user's own freezing survives
    before, flags = state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    gradient = independent_forget_gradient(model, datamodule)
    model.train()

    # tau=0.02 raises the validation loss here: the harm guard would refuse it, and this test is about the step itself
    report = SharpnessAwareUnlearning(
        selection=["net.fc1"], update=FirstOrder(0.02), verbose=False, harm_guard=False
    ).unlearn(model, datamodule)

    assert report.selected_layers == ["net.fc1"] and report.tau == 0.02
    for name in ("net.fc1.weight", "net.fc1.bias"):
        torch.testing.assert_close(
            dict(model.named_parameters())[name].detach(), before[name] - 0.02 * gradient[name], rtol=1e-5, atol=1e-7
        )
    assert_same_state(model, before, except_names={"net.fc1.weight", "net.fc1.bias"})  # BatchNorm buffers too
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())


def test_auto_tau_never_worsens_the_validation_loss(tiny_model):
    model, datamodule = tiny_model
    x, y = datamodule.val

    def val_loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    loss_before = val_loss()
    report = SharpnessAwareUnlearning(update="first_order", verbose=False).unlearn(model, datamodule)
    losses = dict(report.tau_search)
    assert 0.0 in losses and report.tau == min(losses, key=losses.get)
    assert losses[0.0] == pytest.approx(loss_before, rel=1e-5)
    assert val_loss() <= loss_before + 1e-6
    assert val_loss() == pytest.approx(losses[report.tau], rel=1e-5)


def test_without_validation_set_tau_is_chosen_on_a_retain_slice(tiny_model):
    model, _ = tiny_model
    report = SharpnessAwareUnlearning(verbose=False).unlearn(model, TensorDataModule(with_val=False))
    assert report.validation_source == "retain slice"


def test_fine_tune_changes_only_the_selected_layer(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    report = SharpnessAwareUnlearning(update=FineTune(epochs=2, lr=0.05), selection="last", verbose=False).unlearn(
        model, datamodule
    )
    assert report.selected_layers == ["net.fc2"] and report.tau is None
    assert report.update_steps == 2 * (7 + 1)  # 210 retain samples in batches of 32, and 30 corrected
    assert not torch.equal(model.net.fc2.weight.detach(), before["net.fc2.weight"])
    assert_same_state(model, before, except_names={"net.fc2.weight", "net.fc2.bias"})


def test_sample_unlearning_without_corrected_set(tiny_model):
    model, _ = tiny_model
    report = SharpnessAwareUnlearning(verbose=False).unlearn(model, TensorDataModule(with_corrected=False))
    assert report.forget_before.keys() == {"accuracy_trained_labels"}


def test_fast_dev_run_shrinks_the_curvature_pass():
    callback = SharpnessAwareUnlearning(verbose=False)
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[callback])
    trainer.fit(TinyClassifier(), TensorDataModule())
    assert callback.report.curvature_samples == 64


def load_example():
    spec = importlib.util.spec_from_file_location("custom_unlearning", ROOT / "examples" / "custom_unlearning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subclass_overrides_forget_loss_and_selection(tiny_model):
    model, datamodule = tiny_model
    before = state(model)

    def clamped_ascent(logits, wrong, right):
        return -F.cross_entropy(logits, wrong).clamp(max=1.0)

    gradient = independent_forget_gradient(model, datamodule, clamped_ascent)
    example = load_example()
    callback = example.MarginAscent(
        margin=1.0, selection=example.FlattestConvolution(), update=FirstOrder(0.01), verbose=False
    )
    report = callback.unlearn(model, datamodule)
    convolutions = [name for name in report.layer_sharpness if "conv" in name]
    assert report.selected_layers == convolutions == ["net.conv"]
    torch.testing.assert_close(
        model.net.conv.weight.detach(),
        before["net.conv.weight"] - 0.01 * gradient["net.conv.weight"],
        rtol=1e-5,
        atol=1e-7,
    )


def test_a_deprecated_select_layers_override_still_selects(tiny_model):
    class ConvOnly(SharpnessAwareUnlearning):
        def select_layers(self, sharpness):
            return [name for name in sharpness if "conv" in name]

    model, datamodule = tiny_model
    with pytest.warns(DeprecationWarning, match="select_layers"):
        callback = ConvOnly(update=FirstOrder(0.01), verbose=False)
    assert callback.unlearn(model, datamodule).selected_layers == ["net.conv"]


# ---------------------------------------------------------------- bad input: clear error, model untouched
class CustomDataModule(TensorDataModule):
    def __init__(self, forget=None, corrected=None, train=None, **kwargs):
        super().__init__(**kwargs)
        self.overrides = {"forget": forget, "corrected": corrected, "train": train}

    def _override(self, name, default):
        data = self.overrides[name]
        return default() if data is None else DataLoader(TensorDataset(*data), batch_size=self.batch_size)

    def forget_dataloader(self):
        return self._override("forget", super().forget_dataloader)

    def corrected_dataloader(self):
        return self._override("corrected", super().corrected_dataloader)

    def train_dataloader(self):
        return self._override("train", super().train_dataloader)


def _nan_inputs(dm):
    x = dm.x.clone()
    x[5] = float("nan")
    return x, dm.poisoned


BAD_INPUTS = {
    "empty forget set": (dict(), lambda: TensorDataModule(num_forget=0), "forget set is empty"),
    "different lengths": (
        dict(),
        lambda: CustomDataModule(corrected=(torch.randn(20, 1, 8, 8), torch.zeros(20, dtype=torch.long))),
        "differ in length",
    ),
    "labels outside classes": (
        dict(),
        lambda: CustomDataModule(corrected=(torch.randn(30, 1, 8, 8), torch.full((30,), 7))),
        "labels in \\[7, 7\\].*3 outputs",
    ),
    "unknown module": (dict(selection=["net.nope"]), TensorDataModule, "not a module that owns trainable parameters"),
    "module without parameters": (dict(selection=["net.relu"]), TensorDataModule, "not a module that owns trainable"),
    "too many layers": (
        dict(selection=lightning_sa_unlearn.Flattest(num_layers=9)),
        TensorDataModule,
        "num_layers=9.*4 trainable layers",
    ),
    "fine_tune without retain": (
        dict(update="fine_tune"),
        lambda: TensorDataModule(with_retain=False),
        "needs the retain set",
    ),
    "non-finite curvature": (
        dict(),
        lambda: CustomDataModule(train=_nan_inputs(TensorDataModule())),
        "curvature.*not finite",
    ),
    "non-finite loss after the update": (dict(update=FirstOrder(1e10), scale=1e30), TensorDataModule, "non-finite"),
    "non-finite forget gradient": (dict(scale=float("nan")), TensorDataModule, "forget gradient.*not finite"),
    "tau auto without validation data": (
        dict(),
        lambda: TensorDataModule(with_val=False, with_retain=False),
        "needs a validation set",
    ),
}


class ScaledForgetLoss(SharpnessAwareUnlearning):
    """The default forget loss times ``scale``: a way to make gradients or updates blow up."""

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        return self.scale * super().forget_loss(pl_module, forget_batch, corrected_batch)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_the_model_untouched(case, tiny_model):
    kwargs, make_datamodule, message = BAD_INPUTS[case]
    model, _ = tiny_model
    model.train()
    before, flags = state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises((ValueError, RuntimeError), match=message):
        ScaledForgetLoss(verbose=False, **kwargs).unlearn(model, make_datamodule())
    assert_same_state(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())


def test_selecting_a_frozen_module_is_refused(tiny_model):
    model, datamodule = tiny_model
    model.net.fc1.requires_grad_(False)
    before = state(model)
    with pytest.raises(ValueError, match="net.fc1"):
        SharpnessAwareUnlearning(selection=["net.fc1"], verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)
    assert not model.net.fc1.weight.requires_grad


def test_model_without_trainable_parameters_is_refused(tiny_model):
    model, datamodule = tiny_model
    model.requires_grad_(False)
    before = state(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SharpnessAwareUnlearning(verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)


def test_exact_curvature_on_a_large_model_is_refused():
    model = TinyClassifier(hidden=2000)  # 74k parameters in fc1
    before = state(model)
    with pytest.raises(ValueError, match="exact_max_parameters"):
        SharpnessAwareUnlearning(curvature="exact", verbose=False).unlearn(model, TensorDataModule())
    assert_same_state(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update="newton"), "update='newton' is not an Update: pass one of 'first_order'"),
        (dict(selection="random"), "selection='random' is not a Selection"),
        (dict(selection=[]), "non-empty list"),
        (dict(curvature="kfac"), "curvature='kfac' is not a Curvature"),
        (dict(evaluations="mia"), "evaluations takes a list"),
        (dict(update=FirstOrder), r"update=FirstOrder is a class: pass an instance, FirstOrder\(\)"),
        (dict(loss_fn=torch.nn.CrossEntropyLoss), r"'CrossEntropyLoss' must be a callable .* not the class"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharpnessAwareUnlearning(**kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lightning_sa_unlearn.Flattest(num_layers=0), "num_layers"),
        (lambda: lightning_sa_unlearn.FixedStep(-1.0), "tau must be"),
        (lambda: lightning_sa_unlearn.FixedStep(float("nan")), "tau must be"),
        (lambda: ValidatedStep(objective="test"), "objective must be"),
        (lambda: ValidatedStep(grid=[]), "grid must be"),
        (lambda: FirstOrder("best"), "step_size must be"),
        (lambda: lightning_sa_unlearn.GGN(samples=0), "samples must be"),
    ],
)
def test_bad_part_settings_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_parameter_sharding_strategies_are_refused():
    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(RuntimeError, match="shards parameters.*ddp"):
        SharpnessAwareUnlearning().setup(FakeTrainer(), TinyClassifier(), "fit")


# ---------------------------------------------------------------- findings from review
def test_reported_sharpness_is_the_ggn_of_the_training_set(tiny_model):
    model, datamodule = tiny_model
    expected = layer_sharpness(model, hessian_diagonal(model, datamodule.train_dataloader(), method="ggn"))
    report = SharpnessAwareUnlearning(curvature=lightning_sa_unlearn.GGN(samples="all"), verbose=False).unlearn(
        model, datamodule
    )
    assert report.layer_sharpness == pytest.approx(expected, rel=1e-5)


def test_retain_slice_is_the_same_for_every_tau(tiny_model):
    model, _ = tiny_model
    datamodule = TensorDataModule(with_val=False)
    x, y = datamodule.x[datamodule.num_forget :], datamodule.y[datamodule.num_forget :]
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).item()
    report = SharpnessAwareUnlearning(
        update=FirstOrder(ValidatedStep(validation_samples=10**6)), verbose=False
    ).unlearn(model, datamodule)
    assert dict(report.tau_search)[0.0] == pytest.approx(expected, rel=1e-5)


def test_a_failure_while_publishing_restores_the_weights(tiny_model, tmp_path, monkeypatch):
    model, datamodule = tiny_model
    before = state(model)

    def broken(self, prefix="unlearn"):
        raise RuntimeError("logging failed")

    # a folder as report_path is now refused before any work, so the failure comes from logging instead
    monkeypatch.setattr(UnlearningReport, "scalar_metrics", broken)
    with pytest.raises(RuntimeError, match="logging failed"):
        SharpnessAwareUnlearning(report_path=str(tmp_path / "report.json"), verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)
    assert list(tmp_path.iterdir()) == []  # the report written before logging failed is gone too
    with pytest.raises(IsADirectoryError, match="report_path .* is a folder"):
        SharpnessAwareUnlearning(report_path=str(tmp_path), verbose=False).unlearn(model, datamodule)


class LateTestSetDataModule(TensorDataModule):
    """A common datamodule: the test loader exists only after setup('test')."""

    def setup(self, stage):
        if stage == "test":
            self.test_ready = True

    def test_dataloader(self):
        if not getattr(self, "test_ready", False):
            raise AttributeError("test set not built; call setup('test')")
        return super().test_dataloader()


def test_fit_sets_up_the_test_stage_and_can_save_the_unlearned_model(tmp_path):
    path = tmp_path / "unlearned.ckpt"
    # after one epoch the chosen step lowers the validation loss but costs 21 points of validation accuracy, which
    # the harm guard refuses; this test is about the late test set and the saved checkpoint
    callback = SharpnessAwareUnlearning(checkpoint_path=str(path), verbose=False, harm_guard=False)
    model, _, _ = fit_tiny(epochs=1, callbacks=[callback], datamodule=LateTestSetDataModule())
    assert "accuracy" in callback.report.heldout_after
    loaded = TinyClassifier.load_from_checkpoint(path, weights_only=True)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_a_module_named_twice_is_refused(tiny_model):
    model, datamodule = tiny_model
    with pytest.raises(ValueError, match="more than once"):
        SharpnessAwareUnlearning(selection=["net.fc1", "net.fc1"], verbose=False).unlearn(model, datamodule)


@pytest.mark.parametrize("which", ["forget", "train"])
def test_labels_outside_classes_anywhere_are_refused(tiny_model, which):
    model, _ = tiny_model
    before = state(model)
    base = TensorDataModule()
    n = base.num_forget if which == "forget" else len(base.x)
    datamodule = CustomDataModule(**{which: (base.x[:n], torch.full((n,), -1))})
    with pytest.raises(ValueError, match=f"the {'training' if which == 'train' else which} set has labels"):
        SharpnessAwareUnlearning(verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)


def test_tau_objective_adds_the_forget_inputs_under_corrected_labels(tiny_model):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(
        verbose=False, update=FirstOrder(ValidatedStep(objective="validation_and_forget"))
    ).unlearn(model, datamodule)
    chosen_loss = dict(report.tau_search)[report.tau]

    def mean_loss(pairs):
        losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in pairs]
        return float(sum(losses) / sum(len(y) for _, y in pairs))

    with torch.no_grad(), eval_mode(model):
        validation = list(datamodule.val_dataloader())
        relabelled = [(f[0], c[1]) for f, c in zip(datamodule.forget_dataloader(), datamodule.corrected_dataloader())]
        expected = mean_loss(validation) + mean_loss(relabelled)
    assert chosen_loss == pytest.approx(expected, rel=1e-5)
    assert report.validation_source == "val_dataloader + forget inputs with corrected labels"


def test_tau_objective_with_forget_needs_the_corrected_set(tiny_model):
    model, _ = tiny_model
    before = state(model)
    with pytest.raises(ValueError, match="needs corrected_dataloader"):
        SharpnessAwareUnlearning(
            verbose=False, update=FirstOrder(ValidatedStep(objective="validation_and_forget"))
        ).unlearn(model, TensorDataModule(with_corrected=False))
    assert_same_state(model, before)


def test_the_report_travels_in_the_callback_state(tiny_model):
    model, datamodule = tiny_model
    callback = SharpnessAwareUnlearning(verbose=False)
    assert callback.state_dict() == {"report": None}
    report = callback.unlearn(model, datamodule)
    restored = SharpnessAwareUnlearning()
    restored.load_state_dict(callback.state_dict())
    history = restored.restored_report
    assert history.selected_layers == report.selected_layers and history.tau == report.tau
    assert history.format_table() == report.format_table()
    assert restored.report is None  # a stored report is history, never this run's result


def test_a_stored_report_from_another_version_is_ignored_with_a_warning():
    callback = SharpnessAwareUnlearning()
    with pytest.warns(UserWarning, match="the report stored in the checkpoint cannot be read"):
        callback.load_state_dict({"report": {"selected_layers": ["fc"], "a_field_from_the_future": 1}})
    assert callback.restored_report is None and callback.report is None
