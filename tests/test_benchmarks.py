"""The benchmark scripts end to end on the synthetic setting (seconds), with caching, resume and hand checks.

benchmarks/ is not a package: each script is loaded from its path, and it puts its own folder on
``sys.path`` to import ``common``, the helper module the scripts share.
"""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_sa_unlearn import (
    CG,
    GGN,
    FineTune,
    FirstOrder,
    Flattest,
    LastLayer,
    NewtonDecrement,
    SecondOrder,
    Sharpest,
    TopFraction,
    ValidatedStep,
)

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = load("reproduce")
robustness = load("robustness")
common = sys.modules["common"]  # the module both scripts imported
SMALL = ["curvature_samples=64"]  # curvature on 64 samples keeps each unlearning run to a few seconds


@pytest.fixture
def one_thread():
    """PaperCNN on a few hundred images runs faster on one thread, and keeps its speed on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cells(table: str, row: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``row``."""
    [line] = [line for line in table.splitlines() if line.startswith(f"| {row} |")]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def plain_accuracy(model: torch.nn.Module, loader) -> float:
    """Share of samples whose argmax prediction is the label (an independent check of the metrics)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def test_benchmark_pipeline_on_synthetic_data(tmp_path, one_thread):
    out, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--setting", "synthetic", "--seeds", "0", "1", "--out", str(out), "--cache", str(cache), "--set", *SMALL]
    reproduce.main(args)
    table = (out / "synthetic.md").read_text()
    for row in ["poisoned", "retrained", *reproduce.METHODS]:
        assert f"| {row} |" in table
    assert "Layer sweep" in table and "picks the best layer in" in table
    assert (out / "synthetic_layers.png").stat().st_size > 1000
    raw = json.loads((out / "synthetic.json").read_text())
    assert raw["command"] == "python benchmarks/reproduce.py " + " ".join(args)
    assert f"Command: `{raw['command']}`" in table
    assert raw["machine"] == reproduce.current_machine()
    runs = raw["runs"]
    assert set(runs["0"]) >= {"poisoned", "retrained", *reproduce.METHODS}

    # "gap restored %" of one row, by hand: (row − poisoned) / (retrained − poisoned) per seed, mean ± std
    row = "fine-tune all layers on D_r"
    gaps = []
    for seed in ("0", "1"):
        accuracy = {key: runs[seed][key]["heldout"]["accuracy"] for key in ("poisoned", "retrained", row)}
        gaps.append((accuracy[row] - accuracy["poisoned"]) / (accuracy["retrained"] - accuracy["poisoned"]))
    mean, spread = (gaps[0] + gaps[1]) / 2, abs(gaps[0] - gaps[1]) / math.sqrt(2)
    column = cells(table, "method").index("gap restored %")
    assert cells(table, row)[column] == f"{100 * mean:.0f} ± {100 * spread:.0f}"

    # the held-out and forget accuracies against plain argmax accuracy of the cached models
    setting = common.override(common.SETTINGS["synthetic"], SMALL)
    folder = cache / f"synthetic-{common._digest(setting)}" / "seed0"
    datamodule = common.make_datamodule(setting, 0)
    for key, path in (("poisoned", "poisoned.pt"), ("retrained", "retrained.pt")):
        model = common.make_model(setting)
        model.load_state_dict(torch.load(folder / path, weights_only=True)["state_dict"])
        assert runs["0"][key]["heldout"]["accuracy"] == plain_accuracy(model, datamodule.test_dataloader())
        assert runs["0"][key]["forget_trained_labels"] == plain_accuracy(model, datamodule.forget_dataloader())
        assert runs["0"][key]["forget_true_labels"] == plain_accuracy(model, datamodule.corrected_dataloader())

    # a first-order method with a fixed rule is the sweep's run of the layer the rule picks; the others ran apart
    for seed in ("0", "1"):
        sharpness = runs[seed]["layer net.conv1"]["report"]["layer_sharpness"]
        flattest = min(sharpness, key=sharpness.get)
        assert runs[seed]["SA first-order, flattest"] == runs[seed][f"layer {flattest}"]
        assert runs[seed]["first-order, last layer"] == runs[seed]["layer net.fc2"]
        assert runs[seed]["SA second-order, flattest"]["report"]["solver"]["iterations"] <= 30
        sweep = [run for key, run in runs[seed].items() if key.startswith("layer ")]
        assert runs[seed]["fine-tune all layers on D_r"] not in sweep

    # a rerun reads everything from the cache: the results file does not change
    results = folder / "results.json"
    before = results.read_text()
    reproduce.main(args)
    assert results.read_text() == before

    # the results file alone rebuilds the table (of the rerun: its load average differs from the first run's)
    assert "Load average (`uptime`" in table and "## validated_layer" in table
    reproduce.main(["--from-json", str(out / "synthetic.json"), "--out", str(tmp_path / "rebuilt")])
    assert (tmp_path / "rebuilt" / "synthetic.md").read_text() == (out / "synthetic.md").read_text()


def test_only_first_order_methods_with_a_fixed_rule_reuse_the_layer_sweep():
    assert reproduce.sweep_rule(dict(selection=Flattest())) == "flattest"
    assert reproduce.sweep_rule(dict(selection=LastLayer(), update=FirstOrder())) == "last"
    assert reproduce.sweep_rule(dict(selection=NewtonDecrement(), update=FirstOrder(ValidatedStep()))) == (
        "newton_decrement"
    )
    for parts in (
        dict(selection=Sharpest(), update=FirstOrder(0.01)),  # a fixed τ: the sweep chose τ on validation
        dict(selection=Sharpest(), update=FirstOrder(ValidatedStep(objective="validation_and_forget"))),
        dict(selection=Sharpest(), update=FirstOrder(ValidatedStep(grid=[0.0, 0.1]))),
        dict(selection=Flattest(num_layers=2)),
        dict(selection=TopFraction(Flattest(), fraction=0.1)),
        dict(selection=Flattest(), update=SecondOrder()),
        dict(selection=Flattest(), update=FineTune()),
        dict(selection=Flattest(), curvature=GGN(samples=10)),  # not the setting's curvature
        dict(selection=["net.fc1"]),
    ):
        assert reproduce.sweep_rule(parts) is None, parts
    reused = {
        name for name, parts in reproduce.METHODS.items() if reproduce.sweep_rule(parts(common.SETTINGS["synthetic"]))
    }
    assert reused == {
        "first-order, last layer",
        "SA first-order, flattest",
        "SA first-order, sharpest",
        "first-order, newton_decrement",
    }


@pytest.mark.parametrize("name", sorted(common.SETTINGS))
def test_every_method_builds_a_callback_from_the_settings_parts(name):
    setting = common.SETTINGS[name]
    for method, parts in reproduce.METHODS.items():
        callback = common.make_callback(setting, 3, **parts(setting))
        curvature = callback.curvature
        if curvature is None:  # the callback's default estimator: only the row of the defaults asks for it
            assert method.startswith("step then fine-tune, last")
            continue
        assert type(curvature).method == setting.curvature, method
        samples = "all" if setting.curvature_samples is None else setting.curvature_samples
        assert (curvature.samples, curvature.damping) == (samples, setting.damping)
        assert callback.seed == 3 and not callback.verbose and not callback.progress_bar
        if isinstance(callback.update, FineTune):  # the setting's lr; its epochs unless the row names others
            epochs = 3 if "3 epochs" in method else 5 if "5 epochs" in method else setting.fine_tune_epochs
            lr = reproduce.LR_GRID if "lr and best" in method else setting.fine_tune_lr
            if "lr on validation" in method:  # three around the setting's
                lr = [pytest.approx(setting.fine_tune_lr * f) for f in (0.3, 1.0, 3.0)]
            assert (callback.update.epochs, callback.update.lr) == (epochs, lr), method
    second_order = common.make_callback(setting, 0, **reproduce.METHODS["SA second-order, flattest"](setting)).update
    assert isinstance(second_order.solver, CG) and second_order.solver.max_iterations == 30


def test_a_settings_device_and_precision_reach_the_datamodule_and_trainer(monkeypatch, tmp_path):
    from lightning_sa_unlearn.datamodules import TensorBatches

    setting = dataclasses.replace(common.SETTINGS["synthetic"], device="cpu", precision="bf16-mixed")
    assert isinstance(common.make_datamodule(setting, 0).train_dataloader(), TensorBatches)
    seen = {}

    class RecordingTrainer:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit(self, model, datamodule):
            pass

    monkeypatch.setattr(common.pl, "Trainer", RecordingTrainer)
    common.train(setting, 0, "poisoned", str(tmp_path / "model.pt"))
    assert seen["precision"] == "bf16-mixed" and seen["max_epochs"] == setting.epochs


def test_robustness_pipeline_on_synthetic_data(tmp_path, monkeypatch, one_thread):
    small = dataclasses.replace(common.SETTINGS["synthetic"], curvature_samples=64)
    monkeypatch.setitem(common.SETTINGS, "synthetic", small)
    for poison in ("backdoor", "deletion"):
        monkeypatch.setitem(common.SETTINGS, f"synthetic_{poison}", dataclasses.replace(small, poison=poison))
    monkeypatch.setitem(robustness.OPTIONS, "synthetic_backdoor", robustness.OPTIONS["mnist_backdoor"])
    scenarios = ["synthetic", "synthetic_backdoor", "synthetic_deletion"]
    out = tmp_path / "out"
    args = ["--scenarios", *scenarios, "--seeds", "0", "--out", str(out), "--cache", str(tmp_path / "cache")]
    robustness.main(args)
    table = (out / "robustness.md").read_text()
    for column in ("class 9 acc lost to relearn", "attack success regained", "MIA efficacy", "retain acc"):
        assert column in table
    assert "objective='validation_and_forget'" in table  # the backdoor scenario's update, as the run used it
    results = json.loads((out / "robustness.json").read_text())
    runs = results["runs"]
    for scenario in scenarios:
        assert set(runs[scenario]["0"]) == {"poisoned", "retrained", *robustness.RULES}
        for row in runs[scenario]["0"].values():
            assert 0 <= row["mia"]["forget_non_member_rate"] <= 1 and row["relearn"]["samples"] == 40
    deletion = runs["synthetic_deletion"]["0"]["retrained"]
    assert deletion["forget_true_labels"] == deletion["forget_trained_labels"]  # no D̃_f: the labels are true
    backdoor = runs["synthetic_backdoor"]["0"]
    assert (
        backdoor["poisoned"]["heldout"]["attack_success_rate"] > backdoor["retrained"]["heldout"]["attack_success_rate"]
    )
    # the "attack success" cell of the poisoned model, by hand
    section = table.split("## synthetic_backdoor")[1].split("\n## ")[0]
    column = cells(section, "model").index("attack success")
    assert cells(section, "poisoned")[column] == f"{100 * backdoor['poisoned']['heldout']['attack_success_rate']:.2f}"
    # the retrained model's held-out accuracy against plain argmax accuracy of the cached model
    model = common.make_model(small)
    saved = torch.load(tmp_path / "cache" / "synthetic" / "seed0" / "retrained.pt", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    test = common.make_datamodule(small, 0).test_dataloader()
    assert runs["synthetic"]["0"]["retrained"]["heldout"]["accuracy"] == plain_accuracy(model, test)
    assert (out / "robustness.png").stat().st_size > 1000
    # the results file alone rebuilds the table
    robustness.main(["--from-json", str(out / "robustness.json"), "--out", str(tmp_path / "rebuilt")])
    assert (tmp_path / "rebuilt" / "robustness.md").read_text() == table
    assert (tmp_path / "rebuilt" / "robustness.json").read_text() == (out / "robustness.json").read_text()


def test_a_rule_picking_a_layer_outside_the_sweep_is_read_from_its_own_run():
    """ResNet-20's sweep covers each block's last convolution: a rule that picks a BatchNorm is judged by its own
    run; a rule with neither a swept pick nor a run of its own is left out. Shortfalls computed by hand."""
    sweep = sys.modules["sweep"]
    sharpness = {"bn": 1e-4, "conv2": 1e-2, "fc": 5e-1}  # flattest: bn (not swept); sharpest: fc (swept)

    def seed(conv2, fc, flattest):
        report = {"layer_sharpness": sharpness, "newton_decrement": {"bn": 9.0, "conv2": 1.0, "fc": 1.0}}
        layer = lambda accuracy: {"heldout": {"accuracy": accuracy}, "report": report}  # noqa: E731
        return {
            "poisoned": {"heldout": {"accuracy": 0.5}},
            "layer conv2": layer(conv2),
            "layer fc": layer(fc),
            "SA first-order, flattest": {"heldout": {"accuracy": flattest}},
        }

    lines = sweep.sweep_lines({0: seed(0.70, 0.80, 0.75), 1: seed(0.90, 0.60, 0.95)}, [0, 1])
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "| 0 of 2 seeds | 0.00 ± 7.07 | bn, bn |" in rows["flattest"]  # (0.80-0.75, 0.90-0.95) → 5, -5 points
    assert "| 1 of 2 seeds | 15.00 ± 21.21 | fc, fc |" in rows["sharpest"]  # (0, 0.90-0.60) → 0, 30 points
    assert "newton_decrement" not in rows  # picks bn, which neither the sweep nor a run of its own covers
    assert "| 1 of 2 seeds | 15.00 ± 21.21 | fc, fc |" in rows["last"]


def test_cost_over_seeds_summarises_each_seeds_table(tmp_path, one_thread):
    cost_seeds = load("cost_seeds")
    method = "first order, last layer"
    cost_seeds.main(
        ["--setting", "synthetic", "--seeds", "0", "1", "--runs", "1", "--methods", method, "--out", str(tmp_path)]
    )
    per_seed = []
    for seed in (0, 1):
        folder = tmp_path / "cost_seeds"
        _, stages = (folder / f"cost_synthetic_seed{seed}.md").read_text().split("Units per stage")
        units = dict(zip(cells(stages, "method"), cells(stages, method)))
        # counted by the run: the last layer needs no curvature, and the forget gradient reads every forget sample
        assert units["curvature"] == "0" and int(units["forget_gradient"].replace(",", "")) >= 40
        # each seed's numbers at full precision (its table rounds them, which the spread of two seeds cannot bear)
        result = json.loads((folder / f"cost_synthetic_seed{seed}.json").read_text())
        per_seed.append(100 * result["rows"][method]["unlearning_units"] / result["training_units"])
    summary = (tmp_path / "cost_synthetic_seeds.md").read_text()
    mean, spread = cells(summary, method)[2].split(" ± ")
    assert float(mean) == pytest.approx(sum(per_seed) / 2, abs=0.0051)  # the summary prints 2 decimals
    assert float(spread) == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2), abs=0.0051)


def test_the_benchmarks_default_row_is_the_callbacks_default():
    from lightning_sa_unlearn import SharpnessAwareUnlearning, StepThenFineTune

    callback, parts = SharpnessAwareUnlearning(), common.default_parts()
    assert type(callback.selection) is type(parts["selection"]) is LastLayer
    assert type(callback.update) is type(parts["update"]) is StepThenFineTune
    assert repr(callback.update) == repr(parts["update"])


def test_the_loss_threshold_auc_counts_the_pairs_a_test_sample_loses_by_hand(monkeypatch):
    """AUC = P(test loss > forget loss), ties one half: test 0.5 beats 0.1, 0.2 and ties 0.5 twice (3), 0.3 beats
    2, 0.9 beats 4: 9 of 12 pairs."""
    from types import SimpleNamespace

    losses = {"forget": [0.1, 0.2, 0.5, 0.5], "test": [0.5, 0.3, 0.9]}
    monkeypatch.setattr(
        common, "sample_losses", lambda model, loader: SimpleNamespace(losses=torch.tensor(losses[loader]).double())
    )
    data = SimpleNamespace(forget_dataloader=lambda: "forget", test_dataloader=lambda: "test")
    assert common.loss_threshold_auc(None, data) == pytest.approx(9 / 12)
