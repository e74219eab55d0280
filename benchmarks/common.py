"""What the benchmark scripts share: the settings, models, data, training cache, callback and measurements.

Not a package and not installed: each script under ``benchmarks/`` puts its own folder on
``sys.path`` and imports from here (``from common import SETTINGS, train, ...``). The paper-table
experiment itself is ``benchmarks/reproduce.py``; ``benchmarks/robustness.py`` and the others reuse
its settings and its cache of trained models (``cache/benchmarks/<setting>/seed<k>/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from settings import MODELS, SETTINGS, Setting, TorchvisionResNet18  # noqa: E402, F401 (re-exported)

from lightning_sa_unlearn import (
    FirstOrder,
    Flattest,
    HarmfulUpdateError,
    HeldOutMetrics,
    LastLayer,
    SharpnessAwareUnlearning,
    StepThenFineTune,
    UnlearningReport,
)
from lightning_sa_unlearn.callback import quiet_trainer
from lightning_sa_unlearn.curvature import CURVATURES, Curvature, default_curvature
from lightning_sa_unlearn.datamodules import PoisonedLabelDataModule
from lightning_sa_unlearn.objective.losses import sample_losses
from lightning_sa_unlearn.passes import unlearning_units
from lightning_sa_unlearn.selection import trainable_layers


def lr_grid(setting: Setting) -> list[float]:
    """Three fine-tune lrs around the setting's: 0.3, 1 and 3 times it (MNIST: 0.003, 0.01, 0.03)."""
    return [round(setting.fine_tune_lr * factor, 10) for factor in (0.3, 1.0, 3.0)]


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that ran ``benchmarks/<script>`` (``argv``: its words, default the process's), quoted for a shell."""
    words = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{script} {shlex.join(words)}".strip()


def write_results(out: str, name: str, text: str, results: Any) -> None:
    """``<out>/<name>.md`` (the table) and ``<out>/<name>.json`` (the raw numbers it was made from)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def rebuilt_from_json(path: str | None, summarize: Callable[[dict[str, Any]], str]) -> bool:
    """``--from-json PATH``: print ``summarize`` of the recorded results and say so (the script then runs nothing)."""
    if not path:
        return False
    with open(path) as f:
        print(summarize(json.load(f)))
    return True


def recorded_run(script: str, argv: list[str] | None, threads: int, work: Callable[[], Any]) -> dict[str, Any]:
    """``work()`` on ``threads`` torch threads, with the command, thread count and load average before and after."""
    torch.set_num_threads(threads)
    before = list(os.getloadavg())
    runs = work()
    return {
        "command": command_line(script, argv),
        "torch_threads": torch.get_num_threads(),
        "load_average": [before, list(os.getloadavg())],
        "runs": runs,
    }


def make_model(setting: Setting) -> pl.LightningModule:
    return MODELS[setting.model](lr=setting.lr)


def make_datamodule(
    setting: Setting, seed: int, train_labels: str = "poisoned", **options: Any
) -> PoisonedLabelDataModule:
    """The setting's data module (``options``: further arguments, e.g. ``corrected_inputs="triggered"``)."""
    datamodule = PoisonedLabelDataModule(
        dataset=setting.dataset,
        root=setting.root,
        poison=setting.poison,
        num_poisoned=setting.num_poisoned,
        target_class=9,
        num_train=setting.num_train,
        batch_size=setting.batch_size,
        seed=seed,
        train_labels=train_labels,
        device=setting.device,
        flip_to=setting.flip_to,
        **{**setting.extra, **options},
    )
    datamodule.setup("fit")
    return datamodule


def train(setting: Setting, seed: int, labels: str, path: str, **options: Any) -> tuple[pl.LightningModule, float]:
    """Train (or load from the cache) one model; returns it and its training seconds.

    The seed is set before the model is built, so that its initial weights do not depend on what the
    process ran before (until version 0.2 they did, and a model was not reproducible across processes).
    """
    pl.seed_everything(seed, verbose=False)
    model = make_model(setting)
    if setting.device is not None:
        model.to(setting.device)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True, map_location=setting.device)
        model.load_state_dict(saved["state_dict"])
        return model, saved["seconds"]
    trainer = quiet_trainer(
        max_epochs=setting.epochs,
        precision=setting.precision,
        limit_val_batches=0,
        benchmark=setting.device == "cuda",
    )
    start = time.perf_counter()
    trainer.fit(model, make_datamodule(setting, seed, labels, **options))
    seconds = time.perf_counter() - start
    if setting.device is not None:  # Lightning hands the model back on the CPU after fit
        model.to(setting.device)
    print(f"  trained the {labels} model in {seconds:.1f} s", flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "seconds": seconds}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, seconds


def curvature_for(setting: Setting) -> Curvature:
    """The setting's curvature part: its estimator on ``curvature_samples`` samples, with its damping."""
    samples = "all" if setting.curvature_samples is None else setting.curvature_samples
    return CURVATURES[setting.curvature](samples=samples, damping=setting.damping)


def default_parts() -> dict[str, Any]:
    """The callback's default selection and update (version 0.3): the last layer, the closed form, then a
    validated fine-tune."""
    return dict(selection=LastLayer(), update=StepThenFineTune())


def make_callback(setting: Setting, seed: int, **parts: Any) -> SharpnessAwareUnlearning:
    """The callback for one run of ``setting``: its curvature part unless ``parts`` gives one; quiet.

    A row that names no selection or update gets the paper's method, the flattest layer and the first-order
    closed form (the callback's defaults until version 0.3), so that every row keeps the meaning of its name;
    the callback's own defaults are :func:`default_parts`."""
    parts.setdefault("curvature", curvature_for(setting))
    parts.setdefault("selection", Flattest())
    parts.setdefault("update", FirstOrder())
    return SharpnessAwareUnlearning(seed=seed, verbose=False, progress_bar=False, **parts)


def unlearning_cost(
    setting: Setting, report: UnlearningReport, fitted: torch.nn.Module, datamodule: Any, callback: Any
) -> dict[str, Any]:
    """Units of each stage of the unlearning itself (:func:`~lightning_sa_unlearn.passes.unlearning_units`, counted
    passes with curvature and stored-feature passes priced by timing in this process), their sum, and that sum in %
    of training's units (``epochs × |D|``). ``fitted``: the model before unlearning."""
    estimator = callback.curvature or default_curvature(callback.loss_fn)  # the estimator the run used
    units = unlearning_units(report, fitted, datamodule.train_dataloader(), estimator)
    total, training = sum(units.values()), setting.epochs * len(datamodule.train_set)
    return {"units": units, "unlearning_units": total, "units_percent": 100 * total / training}


def unlearn_or_refusal(
    callback: SharpnessAwareUnlearning, model: Any, data: Any
) -> tuple[UnlearningReport | None, dict]:
    """``callback.unlearn(model, data)``; a refusal by the harm guard is a result, not a crash: the weights were
    restored, so the row measures the model as it was. Returns ``(report, {})`` or ``(None, {"refused": message})``."""
    try:
        return callback.unlearn(model, data), {}
    except HarmfulUpdateError as error:
        return None, {"refused": str(error)}


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's info lines (an evaluation applied on its own builds a Trainer for each call)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def measure(model: pl.LightningModule, datamodule: PoisonedLabelDataModule) -> dict:
    """Held-out metrics (with the attack success rate of a backdoor) and the accuracy on ``D_f``.

    ``forget_true_labels`` is the accuracy under ``D̃_f``'s labels; for sample unlearning (no ``D̃_f``)
    the forget samples' labels are their true labels, so it is the accuracy under the trained labels.
    """
    with quiet_lightning():
        metrics = HeldOutMetrics()(model, datamodule)
    forget = metrics["forget"]
    measured = {
        "heldout": metrics["heldout"],
        "forget_true_labels": forget.get("accuracy_corrected_labels", forget["accuracy_trained_labels"]),
        "forget_trained_labels": forget["accuracy_trained_labels"],
    }
    if datamodule.poison == "deletion":
        measured["loss_threshold_auc"] = loss_threshold_auc(model, datamodule)
    return measured


def loss_threshold_auc(model: torch.nn.Module, datamodule: PoisonedLabelDataModule) -> float:
    """The AUC of the loss-threshold membership attack: how well a per-sample loss separates ``D_f`` (members,
    lower loss) from the test split. 0.5: no better than chance; ties count one half (Mann-Whitney U)."""
    members = sample_losses(model, datamodule.forget_dataloader()).losses
    outsiders = sample_losses(model, datamodule.test_dataloader()).losses
    _, inverse, counts = torch.unique(torch.cat([outsiders, members]), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, tied values at their mean rank
    outsider_ranks = ranks[: len(outsiders)].sum() - len(outsiders) * (len(outsiders) + 1) / 2
    return float(outsider_ranks / (len(outsiders) * len(members)))


def stat(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` over seeds (times ``scale``), NaN and missing values left out; the mean alone for one seed."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:  # one seed: no spread to report
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _digest(setting: Setting) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(setting), sort_keys=True).encode()).hexdigest()[:8]


def override(setting: Setting, assignments: list[str]) -> Setting:
    """``setting`` with ``FIELD=VALUE`` assignments applied; values are parsed as JSON where they can be."""
    fields = {f.name for f in dataclasses.fields(Setting)}
    changes = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--set {assignment!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}.")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value  # a bare string such as root=cache/cifar10
    return dataclasses.replace(setting, **changes)


def current_machine() -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def machine_of(path: str, results: dict[str, Any]) -> dict[str, Any]:
    """The machine a results file was made on: its ``machine`` entry or, for files written before it had
    one, the ``Machine:`` clause of the markdown table next to it; failing both, this machine."""
    if "machine" in results:
        return results["machine"]
    table = os.path.splitext(path)[0] + ".md"
    text = open(table).read() if os.path.exists(table) else ""
    found = re.search(r"Machine: (\d+) CPU cores, (\d+) torch threads, torch (.+)\.$", text, re.MULTILINE)
    if found is None:
        return current_machine()
    return {"cpu_cores": int(found[1]), "torch_threads": int(found[2]), "torch": found[3]}


def load_clause(load: list | None) -> str:
    """`` Load average ...`` of a table's machine line from ``[[before x3], [after x3]]``; "" for files without."""
    if not load:
        return ""
    before, after = (" / ".join(f"{v:.2f}" for v in three) for three in load)
    return f" Load average (`uptime`, 1 / 5 / 15 min) before the run {before}, after it {after}."


def sweep_layers(setting: Setting) -> list[str]:
    """The layers of the sweep: every layer of PaperCNN; on ResNet-20 the last convolution of each residual
    block and the classifier (issue #14); none for other models."""
    names = list(trainable_layers(make_model(setting)))
    if setting.model == "paper_cnn":
        return names
    if setting.model == "cifar_resnet20":
        return [name for name in names if name.endswith(".conv2")] + names[-1:]
    return []
