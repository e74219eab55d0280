"""A user's own part of each kind, defined here, run through the callback in Python and from a YAML config."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TensorDataModule, TinyClassifier, assert_same_state, autograd_hessian_diagonal, state

from lightning_sa_unlearn import (
    GGN,
    Curvature,
    Evaluation,
    Selected,
    Selection,
    SharpnessAwareUnlearning,
    Update,
    UpdateResult,
)
from lightning_sa_unlearn.cli import SAUnlearnCLI, UnlearningTrainer


class AutogradDiagonal(Curvature):
    """The exact Hessian diagonal of each batch's summed loss, from torch.autograd.functional.hessian."""

    def batch_sum(self, model, x, y, *, loss_fn, generator):
        diagonal = autograd_hessian_diagonal(model, x, y, loss_fn) * len(y)  # the mean loss's, times the batch
        out, offset = {}, 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                out[name] = diagonal[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        return out


class LargestLayer(Selection):
    """The layer with the most parameters; it compares no curvature."""

    def select(self, measured):
        params = dict(measured.model.named_parameters())
        return [max(measured.layers, key=lambda layer: sum(params[n].numel() for n in measured.layers[layer]))]


class SignStep(Update):
    """``θ_S ← θ_S − η·sign(∇_S L_forget)``."""

    name = "sign_step"

    def __init__(self, eta: float = 0.01) -> None:
        self.eta = eta

    def apply(self, inputs):
        params = dict(inputs.model.named_parameters())
        with torch.no_grad():
            for name in inputs.names:
                params[name].sub_(self.eta * inputs.gradient[name].sign())
        return {}


class ForgetSetLoss(Evaluation):
    """The mean loss on the forget set under its trained labels."""

    key = "forget_set_loss"

    def measure(self, run):
        return {"loss": run.mean_loss(run.model, run.forget)}


def forget_gradient_by_hand(model, datamodule):
    n = datamodule.num_forget
    x, wrong, right = datamodule.x[:n], datamodule.poisoned[:n], datamodule.y[:n]
    model.eval()
    loss = F.cross_entropy(model(x), right, reduction="sum") - F.cross_entropy(model(x), wrong, reduction="sum")
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def forget_loss_by_hand(model, datamodule):
    n = datamodule.num_forget
    with torch.no_grad():
        return F.cross_entropy(model.eval()(datamodule.x[:n]), datamodule.poisoned[:n]).item()


def custom_callback() -> SharpnessAwareUnlearning:
    return SharpnessAwareUnlearning(
        curvature=AutogradDiagonal(samples=32),
        selection=LargestLayer(),
        update=SignStep(eta=0.01),
        evaluations=[ForgetSetLoss()],
        verbose=False,
    )


def test_custom_parts_in_python(tiny_model):
    model, datamodule = tiny_model
    before, gradient = state(model), forget_gradient_by_hand(model, datamodule)
    loss_before = forget_loss_by_hand(model, datamodule)
    report = custom_callback().unlearn(model, datamodule)

    assert report.selected_layers == ["net.fc1"] and report.update == "sign_step"
    for name in ("net.fc1.weight", "net.fc1.bias"):
        g, moved = gradient[name], before[name] - dict(model.named_parameters())[name].detach()
        clear = g.abs() > 1e-6 * g.abs().max()  # entries at float noise may take either sign
        torch.testing.assert_close(moved[clear], 0.01 * g[clear].sign())
        assert (moved[~clear].abs() <= 0.01 + 1e-7).all()
    assert_same_state(model, before, except_names={"net.fc1.weight", "net.fc1.bias"})
    measured = report.evaluations["forget_set_loss"]
    assert measured["before"]["loss"] == pytest.approx(loss_before, rel=1e-6)
    assert measured["after"]["loss"] == pytest.approx(forget_loss_by_hand(model, datamodule), rel=1e-6)
    # ReLU, max-pool and eval-mode BatchNorm: the GGN equals the Hessian diagonal, on the same 32 samples
    reference = TinyClassifier()
    reference.load_state_dict(before)
    ggn = SharpnessAwareUnlearning(curvature=GGN(samples=32), selection=LargestLayer(), verbose=False)
    expected = ggn.unlearn(reference, datamodule).layer_sharpness
    assert report.curvature == "AutogradDiagonal" and report.curvature_samples == 32
    assert report.layer_sharpness == pytest.approx(expected, rel=1e-4)


def test_a_rule_that_compares_no_layers_measures_no_curvature(tiny_model):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection=LargestLayer(), verbose=False).unlearn(model, datamodule)
    assert report.curvature_stop == "report only" and report.curvature_samples <= 256
    assert "curvature" not in report.seconds and report.seconds["curvature_report"] > 0
    assert report.seconds["unlearning"] + report.seconds["reporting"] == pytest.approx(report.seconds["total"])
    assert report.selected_layers == ["net.fc1"]


CONFIG = """
trainer:
  accelerator: cpu
  logger: false
  callbacks:
    - class_path: lightning_sa_unlearn.SharpnessAwareUnlearning
      init_args:
        verbose: false
        curvature:
          class_path: test_custom_parts.AutogradDiagonal
          init_args: {samples: 32}
        selection: {class_path: test_custom_parts.LargestLayer}
        update:
          class_path: test_custom_parts.SignStep
          init_args: {eta: 0.01}
        evaluations:
          - class_path: test_custom_parts.ForgetSetLoss
model: {class_path: conftest.TinyClassifier}
data: {class_path: conftest.TensorDataModule}
"""


def test_custom_parts_from_a_yaml_config(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, datamodule = tiny_model
    start = state(model)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    cli = SAUnlearnCLI(trainer_class=UnlearningTrainer, args=["--config", str(path)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SharpnessAwareUnlearning)]
    assert isinstance(callback.update, SignStep) and callback.update.eta == 0.01
    assert yaml.safe_load(CONFIG)["trainer"]["callbacks"][0]["init_args"]["selection"]["class_path"].endswith(
        type(callback.selection).__name__
    )
    from_yaml = callback.unlearn(model, TensorDataModule())

    reference = TinyClassifier()
    reference.load_state_dict(start)
    in_python = custom_callback().unlearn(reference, datamodule)
    assert_same_state(model, state(reference))
    assert from_yaml.evaluations == in_python.evaluations and from_yaml.layer_sharpness == in_python.layer_sharpness


class StopAtSamples(Selection):
    """The first layer; its own stopping rule ends the curvature pass once it has read ``samples`` samples."""

    needs_curvature = True

    def __init__(self, samples: int) -> None:
        self.samples, self.seen = samples, []

    def stopping_rule(self, confidence):
        def enough(statistics):
            read = int(statistics.state["sum_n"])
            self.seen.append(read)
            return read >= self.samples

        return enough

    def select(self, measured):
        return Selected([next(iter(measured.layers))], report_fields={"first_layer": next(iter(measured.layers))})


class NoisyStep(SignStep):
    """A sign step that reports its own fields under its own names."""

    def apply(self, inputs):
        super().apply(inputs)
        return UpdateResult(tau=self.eta, report_fields={"direction": "sign", "eta": self.eta})


def test_a_custom_stopping_rule_and_custom_report_fields_reach_the_report(tiny_model):
    model, datamodule = tiny_model
    selection = StopAtSamples(samples=100)
    curvature = GGN(max_samples=10_000, min_batches=1)
    callback = SharpnessAwareUnlearning(curvature, selection, NoisyStep(0.001), harm_guard=False, verbose=False)
    report = callback.unlearn(model, datamodule)
    # the pass checks the rule after each unit of 64 samples and stopped at the first past 100, not at the maximum
    assert selection.seen == [64, 128] and report.curvature_samples == 128 and report.curvature_stop == "confident"
    assert report.selection_fields == {"first_layer": "net.conv"}
    assert report.update_fields == {"direction": "sign", "eta": 0.001} and report.tau == 0.001
    assert report.to_dict()["update_fields"] == {"direction": "sign", "eta": 0.001}


def test_an_update_returning_a_dict_keeps_working_and_its_own_keys_are_reported(tiny_model):
    class DictStep(SignStep):
        def apply(self, inputs):
            super().apply(inputs)
            return {"tau": self.eta, "steps": 1, "kind": "dict"}

    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection="last", update=DictStep(0.001), harm_guard=False,
                                      verbose=False).unlearn(model, datamodule)  # fmt: skip
    assert report.tau == 0.001 and report.update_steps == 1 and report.update_fields == {"kind": "dict"}


def test_a_custom_stopping_rule_never_met_warns_and_the_run_goes_on(tiny_model):
    model, datamodule = tiny_model
    selection = StopAtSamples(samples=10_000)  # more than the estimator may read
    callback = SharpnessAwareUnlearning(GGN(max_samples=128, min_batches=1), selection, NoisyStep(0.001),
                                        harm_guard=False, verbose=False)  # fmt: skip
    with pytest.warns(UserWarning, match="read its maximum of 128 samples before the selection's stopping rule"):
        report = callback.unlearn(model, datamodule)
    assert report.curvature_stop == "maximum reached" and report.selection_fields == {"first_layer": "net.conv"}


def test_an_update_gets_what_the_stages_measured_as_its_inputs(tiny_model):
    """The selection, the forget gradient, the curvature and the validation objective reach ``apply`` filled in;
    the objective is the mean validation loss that a hand computation over the validation set gives."""
    seen = {}

    class Probe(Update):
        needs_curvature = True

        def validation(self):
            from lightning_sa_unlearn.updates import ValidationSpec

            return ValidationSpec()

        def apply(self, inputs):
            seen.update(
                names=sorted(inputs.names),
                gradient=sorted(inputs.gradient),
                samples=inputs.curvature.samples,
                source=inputs.objective.source,
                objective=inputs.objective(inputs.model),
                by_hand=F.cross_entropy(inputs.model(datamodule.val[0]), datamodule.val[1]).item(),
            )
            return {}

    model, datamodule = tiny_model
    unlearn = SharpnessAwareUnlearning(GGN(samples=100), selection="last", update=Probe(), verbose=False)
    report = unlearn.unlearn(model, datamodule)
    assert seen["names"] == ["net.fc2.bias", "net.fc2.weight"] == seen["gradient"]  # back-propagated to the selection
    assert seen["samples"] == 100 and seen["source"] == "val_dataloader" == report.harm_guard["source"]
    assert seen["objective"] == pytest.approx(seen["by_hand"], rel=1e-6)


def test_an_update_written_for_apply_run_still_runs_with_a_deprecation_warning(tiny_model):
    class Legacy(Update):
        needs_forget_gradient = False

        def apply(self, run):
            self.size = run.data.forget is not None  # the data is on inputs.run now
            return {}

    class Stale(Update):
        def apply(self, run):
            return {"tau": run.curvature_result.samples}

    model, datamodule = tiny_model
    legacy = Legacy()
    with pytest.warns(DeprecationWarning, match=r"read inputs\.run\.data"):
        SharpnessAwareUnlearning(selection="last", update=legacy, verbose=False).unlearn(model, datamodule)
    assert legacy.size
    before = state(model)
    with pytest.raises(AttributeError, match=r"read inputs\.curvature"):
        SharpnessAwareUnlearning(selection="last", update=Stale(), verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)
