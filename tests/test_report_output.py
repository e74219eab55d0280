"""The report's table, plot and logged figures stay readable for models with many layers."""

import math
import pathlib

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from PIL import Image

from lightning_sa_unlearn import SharpnessAwareUnlearning
from lightning_sa_unlearn.logging_figures import log_report_figures, sender
from lightning_sa_unlearn.report import UnlearningReport

# A ResNet-18's 41 layers; sharpness ranks are a permutation of model order (17 is prime to 41).
RESNET = (
    ["conv1", "bn1"]
    + [f"layer{i}.{b}.{m}" for i in range(1, 5) for b in (0, 1) for m in ("conv1", "bn1", "conv2", "bn2")]
    + [f"layer{i}.0.downsample.{k}" for i in (2, 3, 4) for k in (0, 1)]
    + ["fc"]
)
RANK = {layer: (17 * i) % 41 for i, layer in enumerate(RESNET)}  # 0: flattest
BY_RANK = sorted(RESNET, key=RANK.get)


def report(layers, selected, sharpness=None, classes=0, **fields):
    sharpness = sharpness or {layer: 1e-4 * 1.25 ** RANK.get(layer, i) for i, layer in enumerate(layers)}
    before = {"accuracy": 0.9, "loss": 0.3, **{f"accuracy_class_{k}": 0.5 + 0.04 * k for k in range(classes)}}
    after = {**before, **{f"accuracy_class_{k}": 0.45 + 0.05 * k for k in range(classes)}}
    return UnlearningReport(
        layer_sharpness=sharpness,
        selected_layers=selected,
        num_updated_parameters=10,
        tau=0.1,
        heldout_before=before,
        heldout_after=after,
        sharpness_standard_error={layer: 0.1 * abs(value) for layer, value in sharpness.items()},
        curvature="mc_ggn",
        curvature_samples=512,
        **fields,
    )


def layer_rows(table):
    section = table.split("layer sharpness (")[1].split("\n\n")[0].splitlines()[1:]
    return [line.split()[0] for line in section if not line.startswith(("  …", "  lead over", "  note:"))]


def test_table_of_41_layers_lists_the_selected_layer_and_its_runner_ups():
    table = report(RESNET, [BY_RANK[0]]).format_table()
    rows = layer_rows(table)
    assert len(rows) == 10
    assert rows == [layer for layer in RESNET if RANK[layer] < 10]  # the flattest and the 9 next, model order
    assert "… 31 more layers: see the JSON report (layer_sharpness)" in table
    assert f"{BY_RANK[0]:<30}{1e-4:>12.4e} ± 1.0e-05  <- selected" in table
    assert "metric" in table and "held-out loss" in table and "seconds:" in table  # the rest is unchanged


def test_table_keeps_the_nearest_ranks_on_both_sides_and_the_named_runner_up():
    middle = BY_RANK[20]
    rows = layer_rows(report(RESNET, [middle]).format_table())
    assert set(rows) == set(BY_RANK[15:25])  # ranks 16..24 (distance ≤ 4), then the flatter of 15 and 25
    assert rows == [layer for layer in RESNET if layer in rows]
    far = report(RESNET, [middle], selection_margin={"runner_up": BY_RANK[40], "lead_in_standard_errors": 2.0})
    rows = layer_rows(far.format_table())
    assert set(rows) == set(BY_RANK[16:25]) | {BY_RANK[40]}  # the runner-up first, then distance ≤ 4


def test_table_of_a_small_model_lists_every_layer():
    table = report(["a", "b", "c"], ["b"]).format_table()
    assert layer_rows(table) == ["a", "b", "c"]
    assert "more layers" not in table


def test_plot_grows_with_the_layers(tmp_path):
    for layers in (RESNET, RESNET[:3]):
        report(layers, [layers[0]]).plot(tmp_path / f"{len(layers)}.png")
    heights = {n: Image.open(tmp_path / f"{n}.png").size[1] for n in (41, 3)}
    assert heights == {41: round((0.25 * 41 + 1.2) * 120), 3: 3 * 120}  # inches × dpi 120
    report(RESNET, [RESNET[0]], classes=10).plot(tmp_path / "both.png")  # + the 3-inch per-class panel
    assert Image.open(tmp_path / "both.png").size[1] == heights[41] + 3 * 120


def test_sharpness_figure_draws_each_layer_with_its_standard_error():
    figures_before = plt.get_fignums()
    made = report(RESNET, [BY_RANK[0]], classes=4)
    figures = made.figures()
    assert set(figures) == {"sharpness", "class_accuracy"}
    ax = figures["sharpness"].axes[0]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars.patches) == 41
    assert [bar.get_width() for bar in bars.patches] == pytest.approx([made.layer_sharpness[x] for x in RESNET])
    centres = [bar.get_y() + bar.get_height() / 2 for bar in bars.patches]
    assert centres == sorted(centres) and ax.get_ylim()[0] > ax.get_ylim()[1]  # first layer on top
    assert [t.get_text() for t in ax.get_yticklabels()] == RESNET
    segments = bars.errorbar.lines[2][0].get_segments()
    half_widths = [(s[1][0] - s[0][0]) / 2 for s in segments]
    assert half_widths == pytest.approx([made.sharpness_standard_error[x] for x in RESNET])
    red = [RESNET[i] for i, bar in enumerate(bars.patches) if bar.get_facecolor() == to_rgba("tab:red")]
    assert red == [BY_RANK[0]]
    assert f"selected: {BY_RANK[0]}" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_xscale() == "log" and "mc_ggn, 512 samples" in ax.get_title()

    classes = figures["class_accuracy"].axes[0]
    heights = [bar.get_height() for bar in classes.patches]
    assert heights == pytest.approx([50, 54, 58, 62, 45, 50, 55, 60])  # before, then after, in percent
    assert plt.get_fignums() == figures_before  # nothing registered with pyplot: nothing to close


def test_sharpness_axis_is_linear_with_a_non_positive_value():
    made = report(["a", "b", "c"], ["a"], sharpness={"a": -1e-3, "b": 2e-3, "c": 0.1})
    figures = made.figures()
    assert figures["sharpness"].axes[0].get_xscale() == "linear"
    assert "class_accuracy" not in figures  # no per-class accuracy in this report


def run_with_logger(tiny_model, logger):
    model, datamodule = tiny_model
    trainer = pl.Trainer(
        logger=logger,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return SharpnessAwareUnlearning(verbose=False).unlearn(model, datamodule, trainer=trainer)


def test_tensorboard_gets_the_figures_and_the_table(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=tmp_path)
    result = run_with_logger(tiny_model, logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"unlearn/sharpness", "unlearn/class_accuracy"} <= set(tags["images"])
    assert events.Images("unlearn/sharpness")[0].height == 300  # 4 layers: the 3-inch minimum at 100 dpi
    assert "unlearn/report/text_summary" in tags["tensors"]
    text = events.Tensors("unlearn/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == f"```\n{result.format_table()}\n```"
    logged = events.Scalars("unlearn/heldout_after/accuracy")[0].value
    assert logged == pytest.approx(result.heldout_after["accuracy"])


def test_csv_logger_gets_the_scalars_and_no_figure(tmp_path, tiny_model):
    logger = CSVLogger(save_dir=tmp_path)
    assert sender(logger) is None
    run_with_logger(tiny_model, logger)
    files = [p.name for p in pathlib.Path(logger.log_dir).rglob("*") if p.is_file()]
    assert "metrics.csv" in files and not any(name.endswith((".png", ".txt")) for name in files)


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class WandbLogger(Recorder):  # recognised by its class name, as wandb's is
    pass


class MLFlowLogger(Recorder):
    run_id = "run-1"

    @property
    def experiment(self):
        return self


class CSVLikeLogger(Recorder):
    pass


def test_wandb_and_mlflow_loggers_get_figures_by_class_name():
    wandb, mlflow, other = WandbLogger(), MLFlowLogger(), CSVLikeLogger()
    made = report(["a", "b"], ["a"], classes=2)
    assert log_report_figures([wandb, mlflow, other], made, step=7) == ["WandbLogger", "MLFlowLogger"]
    assert [(name, kwargs["key"], kwargs["step"]) for name, _, kwargs in wandb.calls] == [
        ("log_image", "unlearn/sharpness", 7),
        ("log_image", "unlearn/class_accuracy", 7),
        ("log_text", "unlearn/report", 7),
    ]
    assert wandb.calls[2][2]["data"] == [[made.format_table()]]
    assert [(name, args[0], args[2]) for name, args, _ in mlflow.calls] == [
        ("log_figure", "run-1", "unlearn/sharpness_step7.png"),
        ("log_figure", "run-1", "unlearn/class_accuracy_step7.png"),
        ("log_text", "run-1", "unlearn/report_step7.txt"),
    ]
    assert other.calls == [] and log_report_figures([other], made, step=0) == []
    assert math.isclose(mlflow.calls[0][1][1].get_size_inches()[1], 3.0)  # 2 layers: the minimum height
