"""docs/guarantees.md: each misuse gets one clear message, and the model (and every file) survives it.

CLI cases (links to the input checkpoint, unreadable checkpoints, --overwrite) are in test_cli.py,
the two-process cases in test_distributed.py.
"""

import contextlib
import io
import logging
import math
import sys
import warnings
from types import SimpleNamespace

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
from lightning_sa_unlearn.functional import eval_mode
from lightning_sa_unlearn.guard import HarmfulUpdateError, HarmGuard, SampleLosses, paired_standard_error, sample_losses
from lightning_sa_unlearn.pipeline import UnlearningRun
from lightning_sa_unlearn.processes import Processes
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.updates import forget_loss_descent


def unlearn(model, datamodule, **kwargs):
    return SharpnessAwareUnlearning(verbose=False, progress_bar=False, **kwargs).unlearn(model, datamodule)


def refused(model, datamodule, error, message, **kwargs):
    """Unlearning raises `error` matching `message`, and every parameter and buffer is as it was; returns the error."""
    before = state(model)
    with pytest.raises(error, match=message) as raised:
        unlearn(model, datamodule, **kwargs)
    assert_same_state(model, before)
    return raised.value


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
    "fine-tune lr 1e6": dict(update=FineTune(lr=1e6), selection="flattest"),
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
    model, datamodule = tiny_model
    before = state(model)
    x, y = datamodule.val  # all 90: the guard's seeded subset holds up to 2048

    def correct():
        with torch.no_grad(), eval_mode(model):
            return (model(x).argmax(1) == y).double()

    right = correct()
    with pytest.warns(UserWarning) as caught:  # loss 0.219 -> 0.262, 2.2 SE; accuracy -7.8 points, 2.7 SE
        report = unlearn(model, TensorDataModule(with_corrected=False), update=FirstOrder(0.006), selection=["net.fc1"])
    messages = " ".join(str(w.message) for w in caught)
    assert "Kept: without a corrected set" in messages and "standard errors" in messages
    assert "lowered the validation accuracy of some classes by more than 5 points (class 2 100.0% ->" in messages
    guard = report.harm_guard  # the report carries the check and its warnings too
    assert 2 < guard["rise_in_standard_errors"] < 4 and guard["samples"] == 90 and len(guard["warnings"]) == 2
    assert guard["fired"] == ["standard_errors", "class_accuracy"]
    assert guard["accuracy_before"] == pytest.approx(float(right.mean()))
    assert guard["accuracy_after"] == pytest.approx(float(correct().mean()))
    assert guard["accuracy_standard_error"] == pytest.approx(paired_standard_error(right, correct()))
    assert guard["accuracy_before"] - guard["accuracy_after"] > 0.05  # a fall the accuracy test keeps: 2.7 SE
    assert "harm guard: validation objective (val_dataloader)" in report.format_table()
    # each warning was printed once when raised; the table names them without repeating the text
    assert "kept with 2 warnings (standard_errors, class_accuracy;" in report.format_table()
    assert "lowered the validation accuracy" not in report.format_table()
    assert any(not torch.equal(t, before[name]) for name, t in model.named_parameters())


def test_without_validation_data_the_guard_says_so_once(tiny_model):
    model, _ = tiny_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unlearn(model, TensorDataModule(with_val=False, with_retain=False), update=FirstOrder(0.001))
    skipped = [w for w in caught if "the harm guard is skipped: there is no validation data" in str(w.message)]
    assert len(skipped) == 1


# ---------------------------------------------------------------- damage on a few samples
# A rise of the mean loss carried by k samples is only about √k paired standard errors: the guard also refuses a
# mean validation loss that more than doubles, and a significant fall of validation accuracy.
SE_TEST = "raised the validation objective"  # the mean-loss test's wording


def judged(before, after, corrected=True):
    """The guard's verdict on hand-made per-sample (loss, correctness) pairs of 90 validation samples, one class."""

    def measured(pairs):
        losses = torch.tensor([loss for loss, _ in pairs], dtype=torch.float64)
        correct = torch.tensor([c for _, c in pairs], dtype=torch.float64)
        labels = torch.zeros(len(pairs), dtype=torch.long)
        return SampleLosses(losses, labels, (correct < 1).long(), correct)

    guard = HarmGuard([("validation", [])], "val_dataloader")
    guard.before = [measured(before)]
    guard._measure = lambda run, store=False: [measured(after)]
    run = SimpleNamespace(
        num_classes=1,
        processes=SimpleNamespace(sum_tree=lambda tree: tree),
        data=SimpleNamespace(corrected=object() if corrected else None),
        stage=lambda name: contextlib.nullcontext(),
    )
    return guard.check(run, FirstOrder(0.5))


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected labels", "sample deletion"])
def test_a_loss_that_more_than_doubles_on_a_few_samples_is_refused(corrected):
    # 3 of 90 samples go from 0.2 to 20: the mean 0.2 -> 0.86 is only 1.75 paired standard errors
    before, after = [(0.2, 1.0)] * 90, [(0.2, 1.0)] * 87 + [(20.0, 1.0)] * 3
    doubled = "the mean validation loss more than doubled \\(0.2 → 0.86\\)"
    with pytest.raises(HarmfulUpdateError, match=doubled) as error:
        judged(before, after, corrected)
    assert SE_TEST not in str(error.value) and "validation accuracy fell" not in str(error.value)
    kept = judged(before, [(0.2, 1.0)] * 89 + [(16.0, 1.0)], corrected)  # 0.2 -> 0.376 (1.0 SE): kept
    assert kept.loss_doubled is False and kept.validation_loss_after == pytest.approx(0.2 + 15.8 / 90)


@pytest.mark.parametrize("corrected", [True, False], ids=["corrected labels", "sample deletion"])
def test_a_significant_fall_of_accuracy_on_a_few_samples_is_refused(corrected):
    # 12 of 90 samples turn wrong while every loss stays: -13.3 points, 3.7 paired standard errors
    before, after = [(0.3, 1.0)] * 90, [(0.3, 1.0)] * 78 + [(0.3, 0.0)] * 12
    fell = "accuracy fell from 100.0% to 86.7% \\(−13.3 points, 3.7 "
    with pytest.raises(HarmfulUpdateError, match=fell) as error:
        judged(before, after, corrected)
    assert SE_TEST not in str(error.value) and "more than doubled" not in str(error.value)
    # 8 wrong: -8.9 points but 2.9 standard errors; and 1 wrong of 90 would be 1.1 points at 1.0 SE: both kept
    for wrong in (8, 1):
        kept = judged(before, [(0.3, 1.0)] * (90 - wrong) + [(0.3, 0.0)] * wrong, corrected)
        assert kept.accuracy_fell is False and kept.accuracy_after == pytest.approx(1 - wrong / 90)


def test_fine_tuning_at_lr_1e6_is_refused_on_90_validation_samples(tiny_model):
    model, datamodule = tiny_model  # the case: the loss rose from 0.17 to 21,800, 1.41 SE, and was kept
    assert len(datamodule.val[1]) == 90
    refused(model, datamodule, HarmfulUpdateError, "more than doubled", update=FineTune(lr=1e6), selection="flattest")


class SwapLastTwoClasses(Update):
    """Swaps the last layer's rows of two classes: every sample of those classes turns wrong."""

    def apply(self, inputs):
        params = dict(inputs.model.named_parameters())
        with torch.no_grad():
            for name in inputs.names:
                params[name][[1, 2]] = params[name][[2, 1]].clone()
        return {}


def test_an_update_that_turns_samples_wrong_is_refused_through_the_callback(tiny_model):
    model, datamodule = tiny_model
    error = refused(model, datamodule, HarmfulUpdateError, "validation accuracy fell", update=SwapLastTwoClasses(),
                    selection=["net.fc2"])  # fmt: skip
    assert "Make SwapLastTwoClasses's step smaller" in str(error)


def test_the_accuracy_fall_and_its_paired_standard_error_by_hand():
    def measured(correct):  # per-sample correctness (0.5: half the tokens of a sequence right); one class
        c = torch.tensor(correct, dtype=torch.float64)
        losses, labels = torch.ones(len(c), dtype=torch.float64), torch.zeros(len(c), dtype=torch.long)
        return SampleLosses(losses, labels, (c < 1).long(), c)  # predicted: class 1 (wrong) unless all right

    before, after = [1, 1, 1, 0, 1, 0.5], [1, 0, 0, 1, 1, 0.25]
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / 6
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in d) / 5 / 6)

    def compare(rows, reduce=lambda tree: tree):
        guard = HarmGuard([("validation", [])], "by hand")
        guard.before = [measured([before[i] for i in rows])]
        run = SimpleNamespace(num_classes=1, processes=SimpleNamespace(sum_tree=reduce))
        return guard._compare(run, [measured([after[i] for i in rows])])

    whole = compare(range(6))
    assert whole.accuracy_before == pytest.approx(4.5 / 6) and whole.accuracy_after == pytest.approx(3.25 / 6)
    assert whole.accuracy_standard_error == pytest.approx(by_hand)
    sums = []
    compare(range(3, 6), reduce=lambda tree: sums.append(tree) or tree)  # the other process's sums
    # one all-reduce carries the correctness sums too
    two = compare(range(3), reduce=lambda tree: {name: total + sums[0][name] for name, total in tree.items()})
    assert two.accuracy_standard_error == pytest.approx(by_hand) and two.accuracy_after == whole.accuracy_after
    assert two.to_dict()["accuracy_standard_error"] == pytest.approx(by_hand)


def test_per_sample_correctness_is_the_share_of_right_tokens_that_are_not_padding():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 5, 4, generator=g), torch.randint(0, 5, (3, 4), generator=g)
    target[0, 2:] = -100

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return logits[x] * self.weight

    measured = sample_losses(Fixed(), [(torch.arange(3), target)])
    right = logits.argmax(1) == target
    by_hand = [float(right[i][target[i] != -100].double().mean()) for i in range(3)]
    assert measured.correct.tolist() == pytest.approx(by_hand)


def test_a_kept_update_reports_the_accuracy_the_guard_measured(tiny_model):
    model, datamodule = tiny_model
    x, y = datamodule.val  # all 90 of them: the guard's seeded subset holds up to 2048

    def correct():
        with torch.no_grad(), eval_mode(model):
            return (model(x).argmax(1) == y).double()

    before = correct()
    report = unlearn(model, datamodule)
    after, guard = correct(), report.harm_guard
    assert guard["accuracy_before"] == pytest.approx(float(before.mean()))
    assert guard["accuracy_after"] == pytest.approx(float(after.mean()))
    assert guard["accuracy_standard_error"] == pytest.approx(paired_standard_error(before, after))
    assert guard["fired"] == [] and guard["validation_loss_before"] == guard["before"]


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
        report = unlearn(model, datamodule, update=SecondOrder(solver=solver), curvature=SMALL, selection="flattest")
    assert report.solver["status"] == "max_iterations"
    with pytest.warns(UserWarning, match="applied only if the harm guard passes"):
        refused(
            model,
            datamodule,
            HarmfulUpdateError,
            f"The {solver.name} solve stopped at max_iterations with relative residual",
            update=SecondOrder(1e4, solver=solver),
            curvature=SMALL,
            selection="flattest",
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

        def apply(self, inputs):
            seen.append((inputs.curvature.samples, inputs.hvp_scale))
            return {}

    unlearn(model, datamodule, curvature=GGN(samples=100), update=Probe(), selection="last")
    assert seen == [(100, 2.4)]  # N = 240 training samples; before: N fell back to the 100 curvature samples


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


# ---------------------------------------------------------------- blame where it belongs
def same_bits(model, before):
    """Every parameter and buffer holds the bytes it held (NaN included, which torch.equal calls unequal)."""
    now = state(model)
    assert now.keys() == before.keys()
    for name, value in now.items():
        assert torch.equal(value.reshape(-1).view(torch.uint8), before[name].reshape(-1).view(torch.uint8)), name


def test_weights_that_are_not_finite_are_blamed_on_the_model(tiny_model):
    model, datamodule = tiny_model
    with torch.no_grad():
        model.net.fc1.weight[0, :3] = float("nan")
        model.net.fc2.bias[1] = float("inf")
    before = state(model)
    message = (
        "the model's weights are not finite: net.fc1.weight holds 3 NaN or infinite entries \\(of 576\\), and 1 "
        "other parameter too \\(net.fc2.bias\\).*checkpoint or model is broken"
    )
    with pytest.raises(ValueError, match=message) as raised:
        unlearn(model, datamodule)
    assert "loss_fn" not in str(raised.value)
    same_bits(model, before)


class InfiniteValidation(TensorDataModule):
    def val_dataloader(self):
        x = self.val[0].clone()
        x[5] = float("inf")  # one image
        return self._loader(x, self.val[1])


class NaNForget(TensorDataModule):
    def forget_dataloader(self):
        x = self.x[: self.num_forget].clone()
        x[0, 0, 3, 3] = float("nan")  # one pixel of the first image
        return self._loader(x, self.poisoned[: self.num_forget])


def test_forget_inputs_that_are_not_finite_are_blamed_on_the_data_not_the_loss(tiny_model):
    model, _ = tiny_model
    error = refused(model, NaNForget(), ValueError, "outputs on the first forget samples are NaN or infinite")
    assert "loss_fn is not at fault" in str(error) and "loss_fn returned" not in str(error)


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no guard"])
def test_validation_data_that_is_not_finite_is_blamed_on_the_data(guard, tiny_model):
    model, _ = tiny_model
    message = "validation data \\(val_dataloader\\).*NaN or infinite.*the data is at fault, not the update"
    error = refused(model, InfiniteValidation(), ValueError, message, harm_guard=guard)
    assert ("before any update" in str(error)) is guard  # the guard measures it before; else found on failure


class LazyBuffer(TinyClassifier):
    """Registers a buffer on its first forward, as a model that caches a mask or counts its calls may."""

    def forward(self, x):
        if not hasattr(self, "seen"):
            self.register_buffer("seen", torch.ones(()))
        return super().forward(x)


def test_a_buffer_created_during_the_run_does_not_hide_the_error(tiny_model):
    fitted, datamodule = tiny_model
    model = LazyBuffer()
    model.load_state_dict(fitted.state_dict())
    refused(model, datamodule, HarmfulUpdateError, "beyond 2 standard errors", update=FirstOrder(1e6))
    assert not hasattr(model, "seen")  # removed: the model is as it was, its state_dict keys included


class LazyNoneBuffer(TinyClassifier):
    """Registers a buffer as None and fills it on its first forward (a lazily computed constant)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", None)

    def forward(self, x):
        if self.scale is None:
            self.scale = torch.ones(())
        return super().forward(x) * self.scale


def test_a_buffer_registered_as_none_comes_back_as_none(tiny_model):
    fitted, datamodule = tiny_model
    model = LazyNoneBuffer()
    model.load_state_dict(fitted.state_dict())
    refused(model, datamodule, HarmfulUpdateError, "beyond 2 standard errors", update=FirstOrder(1e6))
    assert "scale" in model._buffers and model.scale is None  # still registered: the next forward works
    model(datamodule.x[:2])


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


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("enabled, terminal", [(False, True), (True, True), (True, False)])
def test_progress_bars_follow_the_trainer_and_stay_out_of_redirected_logs(enabled, terminal, tiny_model, monkeypatch):
    model, datamodule = tiny_model
    monkeypatch.setattr(sys, "stderr", Terminal() if terminal else io.StringIO())
    trainer = quiet_trainer(enable_progress_bar=enabled)
    run = UnlearningRun(trainer, Processes(trainer, torch.device("cpu")), model, None, progress_bar=True)
    assert run.progress([1], "a step", 1).disable is not (enabled and terminal)


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
