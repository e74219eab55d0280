"""Two CPU processes (gloo, ddp_spawn) give the same curvature, selection and update as one."""

import json

import pytest
import torch
from conftest import TensorDataModule, TinyClassifier, quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_sa_unlearn import (
    GGN,
    BatchAdapter,
    EmpiricalFisher,
    ExactHessian,
    FineTune,
    FirstOrder,
    Flattest,
    ForgetLossDescent,
    Hutchinson,
    PoisonedLabelDataModule,
    SharpnessAwareUnlearning,
    StepThenFineTune,
    TopFraction,
    ValidatedLayer,
    hessian_diagonal,
    layer_sharpness,
)
from lightning_sa_unlearn.curvature import hessian_diagonal_sum
from lightning_sa_unlearn.curvature.confidence import SharpnessStatistics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


class SaveAfter(Callback):
    """After `callback` ran in on_train_end, save its report and the weights of this process."""

    def __init__(self, callback, tag, folder):
        self.callback, self.tag, self.folder = callback, tag, folder

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.folder / f"{self.tag}_rank{rank}.json").write_text(json.dumps(self.callback.report.to_dict()))
        torch.save(
            {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            self.folder / f"{self.tag}_rank{rank}.pt",
        )


class ExpectFailure(Callback):
    """Run `callback` after the stages, expecting it to fail; save this process's message and whether weights held."""

    def __init__(self, callback, folder):
        self.callback, self.folder = callback, folder

    def on_train_end(self, trainer, pl_module):
        before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        try:
            self.callback.run(trainer, pl_module, trainer.datamodule)
            message = None
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        unchanged = all(torch.equal(before[k], v) for k, v in pl_module.state_dict().items())
        (self.folder / f"failure_rank{trainer.global_rank}.json").write_text(json.dumps([message, unchanged]))


def frozen_copy(saved):
    """A TinyClassifier holding `saved`, whose training step changes nothing (lr 0, BatchNorm momentum 0)."""
    model = TinyClassifier()
    model.load_state_dict(saved)
    model.lr = 0.0
    model.net.bn.momentum = 0.0
    return model


# Run in order on the same model, in one process and in two; each stage starts where the last ended.
# The fixed steps of "exact" and "empirical_fisher" raise the validation loss: the harm guard would refuse
# them, and these stages are about the arithmetic, so they run without it; the other stages keep the guard.
STAGES = [
    (
        "hutchinson",
        dict(curvature=Hutchinson(num_probes=3, samples=10_000), update=FirstOrder(0.0), evaluations=["mia"]),
    ),
    # read until confident, 2 batches at a time: both world sizes read the same units and stop together
    (
        "sequential",
        dict(curvature=GGN(min_batches=2, confidence=50.0, max_samples=160), update=FirstOrder(0.01), harm_guard=False),
    ),
    # confident after 3 units of 16: two processes read units 3 and 4 in one round and drop the 4th
    (
        "confident",
        dict(curvature=GGN(min_batches=2, batch_size=16, confidence=15.0), update=FirstOrder(0.01), harm_guard=False),
    ),
    ("exact", dict(curvature=ExactHessian(), selection="sharpest", update=FirstOrder(0.01), harm_guard=False)),
    (
        "empirical_fisher",
        dict(curvature=EmpiricalFisher(), selection="last", update=FirstOrder(0.02), harm_guard=False),
    ),
    ("ggn", dict(curvature=GGN(samples=150), update="first_order")),
    # the batch adapter's view of the module (logits from its `net`) under DDP
    ("adapted", dict(curvature=GGN(samples=150), batch_adapter=BatchAdapter(forward="net"))),
    ("validated", dict(curvature=GGN(samples=150), selection=ValidatedLayer(k=2, judge_samples=64))),
    (
        "second_order",
        dict(curvature=GGN(samples=150, damping=1.0), update="second_order", selection="newton_decrement"),
    ),
    (
        "forget_loss",
        dict(update=ForgetLossDescent(steps=2, lr=0.05, retain_samples=100), selection=["net.fc1"]),
    ),
    ("masked", dict(selection=TopFraction(Flattest(), fraction=0.2), update=FirstOrder(0.01))),
    (
        "step_then_fine_tune",
        dict(update=StepThenFineTune(fine_tune=FineTune(epochs=2, lr=[0.05, 0.2], best_epoch=True)), selection="last"),
    ),
    # batches of 32: the processes' SGD steps differ from one process's, so later stages start elsewhere
    ("fine_tune", dict(update=FineTune(epochs=2, lr=0.05), selection="last")),
]
# A stage that names no selection or update runs the paper's method (the defaults until version 0.3).
STAGES = [(tag, {"selection": "flattest", "update": "first_order", **kwargs}) for tag, kwargs in STAGES]
# Stages that read other data than the fit's: one batch per loader, so that the mean gradients of the two
# processes' halves average to the one process's batch and every SGD step is the same step.
DATA = {"step_then_fine_tune": dict(batch_size=256)}


class RecordDiscovered(Callback):
    """Build a data module with part of the poison discovered on this process; save what it chose."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        (self.folder / f"discovered_rank{trainer.global_rank}.json").write_text(json.dumps(discovered_split()))


def discovered_split():
    data = PoisonedLabelDataModule(dataset="synthetic", num_poisoned=40, seed=5, discovered=0.25)
    data.setup("fit")
    return [data.unidentified_positions.tolist(), data.forget_set.tensors[1].tolist(), len(data.retain_set)]


class RunOn(Callback):
    """Run `callback` at the end of fit on `datamodule` instead of the trainer's."""

    def __init__(self, callback, datamodule):
        self.callback, self.datamodule = callback, datamodule

    def on_train_end(self, trainer, pl_module):
        self.callback.run(trainer, pl_module, self.datamodule)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fitted_tiny):
    saved, _ = fitted_tiny
    saved = {k: v for k, v in saved.items()}
    folder = tmp_path_factory.mktemp("ddp")
    callbacks = []
    for tag, kwargs in STAGES:
        own_data = tag in DATA
        callback = SharpnessAwareUnlearning(
            verbose=False, progress_bar=False, seed=3, unlearn_on_train_end=not own_data, **kwargs
        )
        first = RunOn(callback, TensorDataModule(**DATA[tag])) if own_data else callback
        callbacks += [first, SaveAfter(callback, tag, folder)]
    harmful = SharpnessAwareUnlearning(
        update=FirstOrder(1e6), selection="last", unlearn_on_train_end=False, verbose=False
    )
    callbacks += [ExpectFailure(harmful, folder), RecordDiscovered(folder)]
    trainer = quiet_trainer(
        devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=callbacks
    )
    model = frozen_copy(TinyClassifier().state_dict() | saved)
    trainer.fit(model, TensorDataModule())

    single = frozen_copy(TinyClassifier().state_dict() | saved)
    reports, weights = {}, {}
    for tag, kwargs in STAGES:
        report = SharpnessAwareUnlearning(verbose=False, progress_bar=False, seed=3, **kwargs).unlearn(
            single, TensorDataModule(**DATA.get(tag, {}))
        )
        reports[tag] = report.to_dict()
        weights[tag] = {k: v.detach().clone() for k, v in single.state_dict().items()}
    return folder, reports, weights, trainer


def load(folder, tag, rank):
    return json.loads((folder / f"{tag}_rank{rank}.json").read_text()), torch.load(folder / f"{tag}_rank{rank}.pt")


@pytest.mark.parametrize(
    "tag",
    [
        "sequential",
        "confident",
        "exact",
        "empirical_fisher",
        "ggn",
        "adapted",
        "validated",
        "second_order",
        "forget_loss",
        "masked",
        "step_then_fine_tune",
    ],
)
def test_two_processes_equal_one(runs, tag):
    folder, reports, weights, _ = runs
    for rank in (0, 1):
        report, state = load(folder, tag, rank)
        single = reports[tag]
        assert report["selected_layers"] == single["selected_layers"]
        assert report["curvature_samples"] == single["curvature_samples"]
        assert report["curvature_stop"] == single["curvature_stop"]
        # float32 sums in another order; the stages compound, so later ones drift a little more
        assert report["layer_sharpness"] == pytest.approx(single["layer_sharpness"], rel=1e-4)
        assert report["tau"] == (pytest.approx(single["tau"], rel=1e-9) if single["tau"] is not None else None)
        assert report["heldout_after"] == pytest.approx(single["heldout_after"], rel=1e-5, nan_ok=True)
        assert report["forget_after"] == pytest.approx(single["forget_after"], rel=1e-6)
        for name, value in weights[tag].items():
            if not name.endswith("num_batches_tracked"):  # counts the one (lr = 0) training step
                torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)


def test_hutchinson_averages_the_probes_of_every_process(runs, fitted_tiny):
    """Each process reads all curvature samples with probes of its own seed; the estimates are averaged."""
    folder, _, _, _ = runs
    saved, datamodule = fitted_tiny
    model = frozen_copy(TinyClassifier().state_dict() | saved)
    in_order = DataLoader(TensorDataset(datamodule.x, datamodule.poisoned), batch_size=datamodule.batch_size)
    estimates = []
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(3 + 7919 * rank)
        estimates.append(hessian_diagonal(model, in_order, method="hutchinson", num_probes=3, generator=generator))
    expected = layer_sharpness(model, {k: (estimates[0][k] + estimates[1][k]) / 2 for k in estimates[0]})
    # standard errors: each batch's two estimates averaged, then recorded once (not as two replicates)
    per_rank = []
    for rank in (0, 1):
        collector = SharpnessStatistics(model)
        batches = []
        generator = torch.Generator().manual_seed(3 + 7919 * rank)
        hessian_diagonal_sum(
            model,
            in_order,
            method="hutchinson",
            num_probes=3,
            generator=generator,
            on_batch=lambda part, size, c=collector, b=batches: b.append((c.layer_sums(part), size)),
        )
        per_rank.append(batches)
    reference = SharpnessStatistics(model)
    for (y0, size), (y1, _) in zip(*per_rank):
        reference.record((y0 + y1) / 2, size)
    for rank in (0, 1):
        report, _ = load(folder, "hutchinson", rank)
        assert report["layer_sharpness"] == pytest.approx(expected, rel=1e-4)
        assert report["sharpness_standard_error"] == pytest.approx(reference.standard_errors(), rel=1e-4)


def test_fine_tune_leaves_identical_weights_on_every_process(runs):
    folder, _, _, _ = runs
    (report0, state0), (report1, state1) = load(folder, "fine_tune", 0), load(folder, "fine_tune", 1)
    assert report0["update_steps"] == report1["update_steps"] > 0
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name


def test_results_reach_the_parent_process_through_callback_metrics(runs):
    folder, _, _, trainer = runs
    report, _ = load(folder, "fine_tune", 0)
    metric = trainer.callback_metrics["unlearn/heldout_after/accuracy"].item()
    assert metric == pytest.approx(report["heldout_after"]["accuracy"])


def test_a_sequential_curvature_pass_reads_the_same_samples_on_every_process(runs):
    folder, reports, _, _ = runs
    single = reports["sequential"]
    assert single["curvature_stop"] == "maximum reached" and single["curvature_samples"] == 160  # 50 SE: never sure
    for rank in (0, 1):
        report, _ = load(folder, "sequential", rank)
        assert report["sharpness_standard_error"] == pytest.approx(single["sharpness_standard_error"], rel=1e-4)


def test_a_pass_confident_inside_a_round_keeps_the_same_units_on_every_process(runs):
    folder, reports, _, _ = runs
    single = reports["confident"]
    assert single["curvature_stop"] == "confident" and single["curvature_samples"] == 3 * 16
    for rank in (0, 1):
        report, _ = load(folder, "confident", rank)
        assert report["sharpness_standard_error"] == pytest.approx(single["sharpness_standard_error"], rel=1e-4)
        margin, expected = report["selection_margin"], single["selection_margin"]
        assert margin["runner_up"] == expected["runner_up"]
        assert margin["lead_in_standard_errors"] == pytest.approx(expected["lead_in_standard_errors"], rel=1e-4)


def test_membership_inference_is_computed_once_and_shared(runs):
    folder, reports, _, _ = runs
    ranks = [load(folder, "hutchinson", rank)[0]["membership_inference"] for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    for stage in ("before", "after"):
        assert ranks[0][stage] == pytest.approx(reports["hutchinson"]["membership_inference"][stage], rel=1e-6)


def test_a_harmful_update_is_refused_on_every_process(runs):
    folder, _, _, _ = runs
    for rank in (0, 1):
        message, unchanged = json.loads((folder / f"failure_rank{rank}.json").read_text())
        assert message.startswith("HarmfulUpdateError: the first_order update raised the validation objective")
        assert unchanged


def test_validated_layer_makes_the_same_choice_on_every_process(runs):
    folder, reports, _, _ = runs
    single = reports["validated"]["selection_trials"]
    for rank in (0, 1):
        trials = load(folder, "validated", rank)[0]["selection_trials"]
        assert [t["layers"] for t in trials] == [t["layers"] for t in single]
        assert [t["chosen"] for t in trials] == [t["chosen"] for t in single]
        for mine, one in zip(trials, single):
            assert mine["validation_objective"] == pytest.approx(one["validation_objective"], rel=1e-4)


def test_every_process_chooses_the_same_discovered_samples(runs):
    folder = runs[0]
    ranks = [json.loads((folder / f"discovered_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] == discovered_split()
    assert len(ranks[0][0]) == 30 and len(ranks[0][1]) == 10  # 40 poisoned samples, a quarter of them known
