"""README "Guarantees": each misuse gets one clear message, and the model (and every file) survives it.

CLI cases (links to the input checkpoint, unreadable checkpoints, --overwrite) are in test_cli.py,
the two-process cases in test_distributed.py.
"""

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TensorDataModule, TinyClassifier, assert_same_state, quiet_trainer, state
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_sa_unlearn import (
    CG,
    GGN,
    FineTune,
    FirstOrder,
    ForgetLossDescent,
    LiSSA,
    MembershipInference,
    RelearnAttack,
    SecondOrder,
    SharpnessAwareUnlearning,
    Update,
    ValidatedStep,
)
from lightning_sa_unlearn.callback import quiet_trainer as package_quiet_trainer
from lightning_sa_unlearn.data import training_set_size
from lightning_sa_unlearn.guard import HarmfulUpdateError, paired_standard_error
from lightning_sa_unlearn.pipeline import UnlearningRun
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.updates import forget_loss_descent


def unlearn(model, datamodule, **kwargs):
    return SharpnessAwareUnlearning(verbose=False, progress_bar=False, **kwargs).unlearn(model, datamodule)


def refused(model, datamodule, error, message, **kwargs):
    """Unlearning raises `error` matching `message`, and every parameter and buffer is as it was."""
    before = state(model)
    with pytest.raises(error, match=message):
        unlearn(model, datamodule, **kwargs)
    assert_same_state(model, before)


# ---------------------------------------------------------------- the harm guard
def test_paired_standard_error_by_hand():
    before = torch.tensor([1.0, 2.0, 3.0, 4.0])
    after = torch.tensor([1.5, 2.1, 3.9, 4.2])
    d = [0.5, 0.1, 0.9, 0.2]
    mean = sum(d) / 4
    expected = math.sqrt(sum((v - mean) ** 2 for v in d) / 3 / 4)
    assert paired_standard_error(before, after) == pytest.approx(expected)
    assert paired_standard_error(before, before + 1) == 0.0  # a shift that every sample shares is no noise
    assert math.isnan(paired_standard_error(before[:1], after[:1]))


SMALL = GGN(samples=64, damping=1.0)  # Hessian-vector products on 64 samples keep second-order runs short
HARMFUL = {
    "fixed tau 1e6": dict(update=FirstOrder(1e6)),
    "fixed tau 1e6, sample deletion": dict(update=FirstOrder(1e6)),
    "grid without 0": dict(update=FirstOrder(ValidatedStep(search="grid", grid=[10.0, 100.0]))),  # golden tries 0
    "fine-tune lr 1e6": dict(update=FineTune(lr=1e6)),
    "second order, fixed tau": dict(
        update=SecondOrder(1e4, solver=CG(max_iterations=30, tolerance=1e-2)), curvature=SMALL
    ),
}
ADVICE = {
    "fixed tau 1e6": "Lower the fixed step \\(tau=1e\\+06\\)",
    "fixed tau 1e6, sample deletion": "beyond 4 standard errors and 10% of the objective .*Lower the fixed step",
    "grid without 0": "Add 0 \\(no update\\) to the step-size grid",
    "fine-tune lr 1e6": "Lower FineTune's lr|fine-tuning stopped at step",
    "second order, fixed tau": "Lower the fixed step \\(tau=10000\\)",
}


@pytest.mark.parametrize("case", list(HARMFUL))
def test_a_harmful_update_is_undone_and_explained(case, tiny_model):
    model, _ = tiny_model
    datamodule = TensorDataModule(with_corrected="deletion" not in case)
    refused(model, datamodule, (HarmfulUpdateError, FloatingPointError), ADVICE[case], **HARMFUL[case])


def test_tau_1e6_is_refused_with_the_numbers(tiny_model):
    model, datamodule = tiny_model
    message = (
        "raised the validation objective \\(val_dataloader\\) from 0.2\\d+ to .*e\\+07: .* standard errors of the "
        "paired per-sample difference over 90 samples.*weights were restored.*harm_guard=False"
    )
    refused(model, datamodule, HarmfulUpdateError, message, update=FirstOrder(1e6))


def test_the_guard_can_be_turned_off(tiny_model):
    model, datamodule = tiny_model
    report = unlearn(model, datamodule, update=FirstOrder(0.02), selection=["net.fc1"], harm_guard=False)
    assert report.heldout_after["loss"] > report.heldout_before["loss"]  # harmful, and kept as asked


def test_sample_deletion_keeps_a_moderate_rise_with_warnings(tiny_model):
    model, _ = tiny_model
    before = state(model)
    with pytest.warns(UserWarning) as caught:
        report = unlearn(model, TensorDataModule(with_corrected=False), update=FirstOrder(0.01), selection="sharpest")
    messages = " ".join(str(w.message) for w in caught)
    assert "Kept: without a corrected set" in messages and "standard errors" in messages
    assert "lowered the validation accuracy of some classes by more than 5 points (class 2 100.0% ->" in messages
    guard = report.harm_guard  # the report carries the check and its warnings too
    assert 2 < guard["rise_in_standard_errors"] < 4 and guard["samples"] == 90 and len(guard["warnings"]) == 2
    assert "harm guard: validation objective (val_dataloader)" in report.format_table()
    assert "warning: the first_order update lowered the validation accuracy" in report.format_table()
    assert any(not torch.equal(t, before[name]) for name, t in model.named_parameters())


def test_without_validation_data_the_guard_says_so_once(tiny_model):
    model, _ = tiny_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unlearn(model, TensorDataModule(with_val=False, with_retain=False), update=FirstOrder(0.001))
    skipped = [w for w in caught if "the harm guard is skipped: there is no validation data" in str(w.message)]
    assert len(skipped) == 1


# ---------------------------------------------------------------- non-finite losses mid-update
class NaNAfter(SharpnessAwareUnlearning):
    """The default forget loss, NaN from call `start` on (call 1 is the forget-gradient stage)."""

    def __init__(self, start, **kwargs):
        super().__init__(verbose=False, progress_bar=False, **kwargs)
        self.start, self.calls = start, 0

    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        self.calls += 1
        loss = super().forget_loss(pl_module, forget_batch, corrected_batch)
        return loss * float("nan") if self.calls >= self.start else loss


def test_forget_loss_descent_stops_at_the_first_nan(tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    callback = NaNAfter(4, update=ForgetLossDescent(steps=10, lr=0.01), selection="last")
    with pytest.raises(FloatingPointError, match="forget-loss descent stopped at step 3: .* not finite"):
        callback.unlearn(model, datamodule)
    assert_same_state(model, before)


def test_forget_loss_descent_on_its_own_restores_the_parameters():
    model = TinyClassifier().double()
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.arange(8) % 3
    before = state(model)

    def poisoned(m, batch, _):
        return F.cross_entropy(m(batch[0]), batch[1]) * float("inf")

    with pytest.raises(FloatingPointError, match="step 1"):
        forget_loss_descent(model, ["net.fc2.weight"], [(x, y)], None, None, forget_loss=poisoned)
    assert_same_state(model, before)


def test_fine_tune_stops_at_the_first_non_finite_loss(tiny_model):
    model, base = tiny_model
    x = base.x.clone()
    x[100] = float("nan")  # one retain sample: the loss of its batch is NaN

    class NaNRetain(TensorDataModule):
        def retain_dataloader(self):
            return DataLoader(TensorDataset(x[30:], base.y[30:]), batch_size=32)

    refused(model, NaNRetain(), FloatingPointError, "fine-tuning stopped at step \\d+: the loss", update=FineTune())


# ---------------------------------------------------------------- unconverged solves
UNCONVERGED = [CG(max_iterations=2), LiSSA(max_iterations=2, scale=1000.0)]  # a scale: no power iteration


@pytest.mark.parametrize("solver", UNCONVERGED, ids=["cg", "lissa"])
def test_an_unconverged_solve_is_applied_with_a_warning_only_if_harmless(solver, tiny_model):
    model, datamodule = tiny_model
    with pytest.warns(UserWarning, match=f"the {solver.name} solve stopped at max_iterations=2 with relative residual"):
        report = unlearn(model, datamodule, update=SecondOrder(solver=solver), curvature=SMALL)
    assert report.solver["status"] == "max_iterations"
    with pytest.warns(UserWarning, match="applied only if the harm guard passes"):
        refused(
            model,
            datamodule,
            HarmfulUpdateError,
            f"The {solver.name} solve stopped at max_iterations with relative residual",
            update=SecondOrder(1e4, solver=solver),
            curvature=SMALL,
        )


# ---------------------------------------------------------------- data that cannot serve
class OnePass(TensorDataModule):
    def __init__(self, which, **kwargs):
        super().__init__(**kwargs)
        self.which = which

    def forget_dataloader(self):
        loader = super().forget_dataloader()
        return (batch for batch in loader) if self.which == "forget" else loader

    def train_dataloader(self):
        loader = super().train_dataloader()
        return iter(loader) if self.which == "train" else loader

    def val_dataloader(self):
        loader = super().val_dataloader()
        return iter(list(loader)) if self.which == "val" else loader


@pytest.mark.parametrize("which", ["forget", "train", "val"])
def test_a_loader_that_can_be_read_once_is_refused(which, tiny_model):
    model, _ = tiny_model
    message = f"{which}_dataloader\\(\\) returned a .* read only once .* Return a DataLoader or a list"
    refused(model, OnePass(which), ValueError, message)


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


class StreamingTrain(TensorDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(self.x, self.poisoned), batch_size=32)


def test_an_iterable_training_set_is_counted_not_guessed(tiny_model):
    model, _ = tiny_model
    datamodule = StreamingTrain()
    assert training_set_size(datamodule.train_dataloader()) == training_set_size(list(datamodule.train_dataloader()))
    seen = []

    class Probe(Update):
        needs_curvature = True

        def apply(self, run):
            seen.append((run.training_size, run.curvature_result.samples, run.hvp_scale))
            return {}

    unlearn(model, datamodule, curvature=GGN(samples=100), update=Probe(), selection="last")
    assert seen == [(240, 100, 2.4)]  # before: N fell back to the 100 curvature samples


class FloatLabels(TensorDataModule):
    def forget_dataloader(self):
        return DataLoader(TensorDataset(self.x[:30], self.poisoned[:30].float()), batch_size=32)


def test_float_labels_are_refused(tiny_model):
    model, _ = tiny_model
    refused(model, FloatLabels(), ValueError, "the forget set has torch.float32 labels.*class indices.*y.long\\(\\)")


class DictOutput(TinyClassifier):
    def forward(self, x):
        return {"logits": super().forward(x)}


class TupleOutput(TinyClassifier):
    def forward(self, x):
        return super().forward(x), x


@pytest.mark.parametrize("cls, what", [(DictOutput, "a dict with keys \\['logits'\\]"), (TupleOutput, "a tuple")])
def test_a_forward_that_does_not_return_logits_is_refused(cls, what, tiny_model):
    fitted, datamodule = tiny_model
    model = cls()
    model.load_state_dict(fitted.state_dict())
    refused(model, datamodule, TypeError, f"forward\\(x\\) returned {what}, but unlearning needs the logits")


class VectorLoss(SharpnessAwareUnlearning):
    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        x, y = forget_batch
        return -F.cross_entropy(pl_module(x), y, reduction="none")


class DetachedLoss(SharpnessAwareUnlearning):
    def forget_loss(self, pl_module, forget_batch, corrected_batch):
        return super().forget_loss(pl_module, forget_batch, corrected_batch).detach()


@pytest.mark.parametrize(
    "cls, message",
    [
        (VectorLoss, "returned a tensor of shape \\(30,\\); it must return one number"),
        (DetachedLoss, "returned a tensor that does not depend on the parameters"),
    ],
)
def test_a_forget_loss_autograd_cannot_use_is_refused(cls, message, tiny_model):
    model, datamodule = tiny_model
    before = state(model)
    with pytest.raises(ValueError, match=message):
        cls(verbose=False).unlearn(model, datamodule)
    assert_same_state(model, before)


# ---------------------------------------------------------------- files
@pytest.fixture
def files(tmp_path):
    return dict(
        checkpoint_path=str(tmp_path / "out" / "unlearned.ckpt"),
        report_path=str(tmp_path / "out" / "report.json"),
        plot_path=str(tmp_path / "out" / "sharpness.png"),
    )


def test_a_failed_run_leaves_nothing_behind(tiny_model, tmp_path, files, monkeypatch):
    model, datamodule = tiny_model
    before = state(model)

    def broken_plot(self, path):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(UnlearningReport, "plot", broken_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):  # after the checkpoint and report were written
        unlearn(model, datamodule, selection="last", update=FirstOrder(0.0), **files)
    assert_same_state(model, before)
    assert list(tmp_path.iterdir()) == []  # not even the folder it made


def test_files_of_an_earlier_run_are_kept_unless_asked(tiny_model, tmp_path, files):
    model, datamodule = tiny_model
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("an earlier run's report")
    before = state(model)
    callback = SharpnessAwareUnlearning(verbose=False, selection="last", update=FirstOrder(0.0), **files)
    with pytest.raises(FileExistsError, match="report_path .*report.json' exists already.*overwrite=True"):
        callback.unlearn(model, datamodule)
    assert_same_state(model, before)
    assert (tmp_path / "out" / "report.json").read_text() == "an earlier run's report"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]
    callback.unlearn(model, datamodule, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "sharpness.png", "unlearned.ckpt"]
    assert UnlearningReport.from_json(tmp_path / "out" / "report.json").selected_layers == ["net.fc2"]


def test_two_outputs_naming_one_file_are_refused(tiny_model, tmp_path):
    model, datamodule = tiny_model
    (tmp_path / "link").symlink_to(tmp_path)
    paths = dict(report_path=str(tmp_path / "a.json"), checkpoint_path=str(tmp_path / "link" / "a.json"))
    refused(model, datamodule, ValueError, "report_path .* and checkpoint_path .* name the same file", **paths)


def test_fast_dev_run_writes_no_file(tmp_path, files):
    callback = SharpnessAwareUnlearning(verbose=False, selection="last", update=FirstOrder(0.0), **files)
    quiet_trainer(fast_dev_run=True, callbacks=[callback]).fit(TinyClassifier(), TensorDataModule())
    assert callback.report is not None and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- conventions
def test_a_csv_logger_is_saved(tiny_model, tmp_path):
    model, datamodule = tiny_model
    callback = SharpnessAwareUnlearning(verbose=False, selection="last", update=FirstOrder(0.0))
    callback.unlearn(model, datamodule, trainer=quiet_trainer(logger=CSVLogger(tmp_path)))
    assert "unlearn/heldout_after/accuracy" in next(tmp_path.rglob("metrics.csv")).read_text()


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_bars_follow_the_trainer(enabled, tiny_model):
    model, datamodule = tiny_model
    trainer = quiet_trainer(enable_progress_bar=enabled)
    run = UnlearningRun(trainer, Processes(trainer, torch.device("cpu")), model, None, progress_bar=True)
    assert run.progress([1], "a step", 1).disable is not enabled


def test_the_quiet_trainer_prints_no_banner(capsys, caplog):
    with caplog.at_level(logging.INFO):
        package_quiet_trainer(accelerator="cpu")
    assert "GPU available" not in capsys.readouterr().out + caplog.text
    assert logging.getLogger("lightning.pytorch.utilities.rank_zero").level == logging.NOTSET  # restored


# ---------------------------------------------------------------- several processes, without starting them
class Rank(Processes):
    """A stand-in for one of two processes: collectives are replaced by `broadcast_value` and `reduce`."""

    def __init__(self, rank, broadcast_value=None, reduce=None):
        self.rank, self.world_size, self.device = rank, 2, torch.device("cpu")
        self.broadcast_value, self.reduce = broadcast_value, reduce
        self.strategy = self

    def broadcast(self, obj, src=0):
        return self.broadcast_value if self.rank else obj

    def agree(self, work):
        return work()


@pytest.mark.parametrize("evaluation", [MembershipInference(samples=40), RelearnAttack(samples=5, steps=1)])
def test_attacks_run_on_rank_zero_and_are_broadcast(evaluation, tiny_model, monkeypatch):
    model, datamodule = tiny_model
    run = UnlearningRun.standalone(model, datamodule, loss_fn=F.cross_entropy, seed=0)
    run.build_batches()
    computed = evaluation.measure(run)
    run.processes = Rank(1, broadcast_value=computed)
    module = "membership" if isinstance(evaluation, MembershipInference) else "relearn"
    name = "membership_inference" if module == "membership" else "relearn_evaluation"

    def must_not_run(*args, **kwargs):
        raise AssertionError("rank 1 computed the attack")

    monkeypatch.setattr(f"lightning_sa_unlearn.evaluations.{module}.{name}", must_not_run)
    assert evaluation.measure(run) == computed


def test_a_lost_peer_is_reported_as_another_process_failing():
    def reduce(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:5")

    processes = Rank(0)
    processes.reduce = reduce
    with pytest.raises(RuntimeError, match="another process failed while unlearning .*Connection closed by peer"):
        Processes.sum(processes, torch.ones(1))
