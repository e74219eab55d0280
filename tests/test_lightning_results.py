"""Where a Lightning user finds the unlearned model: the checkpoint beside ModelCheckpoint's, tested and resumed."""

import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import TensorDataModule, TinyClassifier, state
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sa_unlearn import FirstOrder, SharpnessAwareUnlearning, ValidatedStep
from lightning_sa_unlearn.unlearned_checkpoints import free_name


def trainer(tmp_path, epochs, *callbacks, checkpoints=True):
    extra = [ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)] if checkpoints else []
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[*extra, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=checkpoints,
    )


class FirstWeights(pl.Callback):
    """The weights a fit starts its first step from."""

    def on_train_start(self, trainer, pl_module):
        self.weights = state(pl_module)


def test_the_unlearned_checkpoint_is_beside_model_checkpoints_tests_as_the_report_says_and_resumes(tmp_path):
    pl.seed_everything(0, verbose=False)
    datamodule, model = TensorDataModule(), TinyClassifier()
    callback = SharpnessAwareUnlearning(selection="last", update=FirstOrder(0.02), harm_guard=False, verbose=False)
    fitting = trainer(tmp_path, 2, callback)
    fitting.fit(model, datamodule)
    path = str(tmp_path / "checkpoints" / "unlearned.ckpt")
    assert os.path.isfile(path) and callback.report.unlearned_checkpoint == path
    unlearned = torch.load(path, weights_only=False)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    moved = "net.fc2.weight"
    assert not torch.equal(last["state_dict"][moved], unlearned["state_dict"][moved])  # last.ckpt: before unlearning
    torch.testing.assert_close(unlearned["state_dict"][moved], model.net.fc2.weight.detach(), rtol=0, atol=0)
    assert unlearned["optimizer_states"][0]["state"] == {}  # moments from the poisoned data are dropped
    assert unlearned["optimizer_states"][0]["param_groups"][0]["lr"] == model.lr
    assert unlearned["lightning_sa_unlearn"] == {"unlearned": True, "resumable": True}

    tested = fitting.test(TinyClassifier(), datamodule, ckpt_path=path, verbose=False)
    assert tested[0]["test_acc"] == pytest.approx(callback.report.heldout_after["accuracy"], abs=1e-6)

    first = FirstWeights()
    resumed = trainer(tmp_path / "resumed", 3, first, checkpoints=False)
    resumed.fit(TinyClassifier(), datamodule, ckpt_path=path)
    assert resumed.current_epoch == 3  # epochs 0-1 came from the checkpoint, one more was trained
    for name, value in unlearned["state_dict"].items():
        torch.testing.assert_close(first.weights[name], value, rtol=0, atol=0)


def test_names_are_versioned_like_model_checkpoint(tmp_path):
    assert free_name(str(tmp_path)) == str(tmp_path / "unlearned.ckpt")
    (tmp_path / "unlearned.ckpt").touch()
    (tmp_path / "unlearned-v1.ckpt").touch()
    assert free_name(str(tmp_path)) == str(tmp_path / "unlearned-v2.ckpt")


def test_resuming_a_finished_run_says_in_one_line_why_it_did_not_unlearn(tmp_path):
    datamodule = TensorDataModule()
    trainer(tmp_path, 1).fit(TinyClassifier(), datamodule)
    callback = SharpnessAwareUnlearning(selection="last", verbose=False)
    again = trainer(tmp_path / "again", 1, callback, checkpoints=False)
    with pytest.warns(UserWarning, match=r"unlearning did not run: the checkpoint .*last.ckpt' had finished training"):
        again.fit(TinyClassifier(), datamodule, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert callback.report is None


def test_fit_from_a_weights_only_unlearned_checkpoint_is_refused_with_the_reason(tmp_path, tiny_model):
    model, datamodule = tiny_model
    path = tmp_path / "weights.ckpt"
    SharpnessAwareUnlearning(selection="last", checkpoint_path=str(path), verbose=False).unlearn(model, datamodule)
    callback = SharpnessAwareUnlearning(selection="last", verbose=False)
    with pytest.raises(ValueError, match="holds the weights only .* training cannot resume from it"):
        trainer(tmp_path, 2, callback, checkpoints=False).fit(TinyClassifier(), datamodule, ckpt_path=path)


def test_a_wrong_layer_name_fails_before_training_with_a_suggestion(tmp_path):
    model, datamodule = TinyClassifier(), TensorDataModule()
    before = state(model)
    callback = SharpnessAwareUnlearning(selection=["fc2"], verbose=False)
    with pytest.raises(ValueError, match=r"\['fc2'\], which is not a module .* \(did you mean 'net.fc2'\?\)"):
        trainer(tmp_path, 2, callback).fit(model, datamodule)
    for name, value in state(model).items():
        assert torch.equal(value, before[name]), name  # not one training step


@pytest.mark.parametrize(
    "step, message",
    [
        (FirstOrder(0.0), r"τ = 0 was fixed \(step_size=0\): the model is unchanged"),
        (FirstOrder(ValidatedStep(search="grid", grid=[0.0])), r"τ = 0 was chosen: no step size lowered"),
    ],
)
def test_a_step_of_size_zero_says_the_model_is_unchanged(tiny_model, step, message):
    model, datamodule = tiny_model
    before = state(model)
    with pytest.warns(UserWarning, match=message):
        report = SharpnessAwareUnlearning(selection="last", update=step, verbose=False).unlearn(model, datamodule)
    assert report.tau == 0 and all(torch.equal(v, before[k]) for k, v in state(model).items())


class MisnamedCorrected(TensorDataModule):
    def __init__(self):
        super().__init__(with_corrected=False)

    def correct_dataloader(self):  # a typo: the run cannot know it is the corrected set
        return self._loader(self.x[: self.num_forget], self.y[: self.num_forget])


def test_the_kind_of_unlearning_and_the_loaders_read_are_named(tiny_model, caplog):
    model, _ = tiny_model
    unlearning = SharpnessAwareUnlearning(selection="last", update=FirstOrder(0.001), verbose=False)
    with caplog.at_level("INFO"):
        unlearning.unlearn(model, TensorDataModule())
    assert (
        "unlearning by label correction (D_f and its corrected labels D̃_f); loaders read: train_dataloader(), "
        "forget_dataloader(), corrected_dataloader(), retain_dataloader(), val_dataloader()" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        unlearning.unlearn(model, TensorDataModule(with_corrected=False))
    assert "unlearning by sample deletion (no corrected_dataloader() was found" in caplog.text
    with pytest.warns(UserWarning, match=r"\['correct_dataloader'\] look like a corrected set: name the method"):
        unlearning.unlearn(model, MisnamedCorrected())


def test_the_report_only_curvature_is_named_as_it_ran_and_can_be_skipped(tiny_model, tmp_path):
    model, datamodule = tiny_model
    report = SharpnessAwareUnlearning(selection="last", update=FirstOrder(0.001), verbose=False).unlearn(
        model, datamodule
    )
    assert (report.curvature, report.curvature_samples, report.curvature_stop) == ("ggn", 240, "report only")
    assert "curvature_report" in report.seconds and len(report.layer_sharpness) == 4
    skipped = SharpnessAwareUnlearning(
        selection="last", update=FirstOrder(0.001), report_sharpness=False, plot_path=str(tmp_path / "plot.png")
    ).unlearn(model, datamodule)
    assert skipped.curvature is None and skipped.layer_sharpness == {} and "curvature_report" not in skipped.seconds
    assert skipped.selected_layers == ["net.fc2"] and (tmp_path / "plot.png").is_file()
    assert "update: first_order" in skipped.format_table()


def test_an_update_that_keeps_the_weights_says_the_model_is_unchanged():
    from lightning_sa_unlearn import FineTune

    torch.manual_seed(1)
    model, datamodule = TinyClassifier(), TensorDataModule()  # untrained: lr=20 makes every epoch worse
    update = FineTune(epochs=2, lr=20.0, best_epoch=True)
    with pytest.warns(UserWarning, match="the fine_tune update left the selected parameters as they were"):
        report = SharpnessAwareUnlearning(selection="last", update=update, verbose=False).unlearn(model, datamodule)
    assert report.update_details["best_epoch"] == 0
