"""What the CLI and the Python API write, and read: hostile checkpoints, user files, stale reports, races.

Each test reproduces a case where a user could be hurt, then checks the message, the weights and the
bytes of every file the user had.
"""

import fractions
import os
import pathlib
import sys
import time
import typing
from collections.abc import Callable

import pytest
import torch
import yaml
from conftest import TensorDataModule, TinyClassifier, quiet_trainer
from test_cli import FAST, _in_a_temporary_folder, config, digest, fitted  # noqa: F401 (fixtures)
from torch import nn

from lightning_sa_unlearn import FirstOrder, PoisonedLabelDataModule, SharpnessAwareUnlearning, outputs
from lightning_sa_unlearn.checkpoints import is_plain
from lightning_sa_unlearn.cli import UnlearningTrainer, main
from lightning_sa_unlearn.models import PaperCNN
from lightning_sa_unlearn.outputs import OutputFiles, remove_abandoned_temporaries, temporary_name

STEP = dict(
    selection="last",
    harm_guard=False,
    update={"class_path": "lightning_sa_unlearn.FirstOrder", "init_args": {"step_size": 0.0002}},
)


def configured(folder: pathlib.Path, **unlearning) -> pathlib.Path:
    """A config (as in test_cli) in its own folder below ``folder``, whose ModelCheckpoint writes there too."""
    (folder / "config").mkdir(exist_ok=True)
    return config(folder / "config", **unlearning)


def files(folder: pathlib.Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with its digest."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


# ---------------------------------------------------------------- 1. nothing a checkpoint names is imported
MARKER_MODULE = "shipped_with_the_checkpoint"


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module beside the checkpoint (and on sys.path, as the working folder is) that leaves a marker if imported."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{MARKER_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('module ran')\n"
        "class Model:\n"
        f"    def __init__(self, *args, **kwargs):\n        open({str(marker)!r}, 'w').write('class built')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    yield marker
    assert MARKER_MODULE not in sys.modules


def hostile(ckpt: pathlib.Path, folder: pathlib.Path, **hyper_parameters) -> pathlib.Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    if "class_path" in hyper_parameters:  # the key LightningCLI would build from, alone
        del checkpoint["hyper_parameters"]["_class_path"]
    checkpoint["hyper_parameters"].update(hyper_parameters)
    path = folder / "downloaded.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("key", ["_class_path", "class_path"])
@pytest.mark.parametrize("subcommand", ["unlearn", "validate"])
def test_a_class_named_by_a_checkpoint_is_never_imported(fitted, tmp_path, marker_module, key, subcommand):
    _, _, ckpt = fitted
    path, cfg = hostile(ckpt, tmp_path, **{key: f"{MARKER_MODULE}.Model"}), configured(tmp_path)
    before = files(tmp_path)
    with pytest.raises(ValueError, match=f"names the class '{MARKER_MODULE}.Model'.*was not imported") as error:
        main([subcommand, "--config", str(cfg), "--ckpt_path", str(path)])
    assert f"--model {MARKER_MODULE}" not in str(error.value)  # no advice to run what the file names
    assert not marker_module.exists() and files(tmp_path) == before


def test_a_checkpoint_cannot_swap_the_configured_model(fitted, tmp_path):
    _, _, ckpt = fitted
    path = hostile(ckpt, tmp_path, class_path="lightning_sa_unlearn.models.CifarResNet20")
    built = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lightning_sa_unlearn.models.CifarResNet20.__init__", lambda *a, **k: built.append(1))
        with pytest.raises(ValueError, match="CifarResNet20.*your model is lightning_sa_unlearn.models.PaperCNN"):
            main(["unlearn", "--config", str(configured(tmp_path)), "--ckpt_path", str(path)])
    assert built == []


def test_nested_class_paths_in_hyperparameters_are_not_applied(fitted, tmp_path, marker_module):
    _, _, ckpt = fitted
    path = hostile(ckpt, tmp_path, backbone={"class_path": f"{MARKER_MODULE}.Model", "init_args": {}})
    output = tmp_path / "out.ckpt"
    with pytest.warns(UserWarning, match=r"hyperparameters \['backbone'\] are not applied"):
        main(["unlearn", "--config", str(configured(tmp_path, **FAST)), "--ckpt_path", str(path),
              "--output_path", str(output)])  # fmt: skip
    assert output.exists() and not marker_module.exists()


class PaperCNNWithParts(PaperCNN):
    """PaperCNN with arguments a parser would resolve from a dotted string (a callable, a module, a class)."""

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        activation: Callable | None = None,
        block: nn.Module | None = None,
        kind: type | None = None,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)


def test_a_string_for_a_class_typed_argument_is_not_applied(fitted, tmp_path, marker_module):
    _, _, ckpt = fitted
    named = f"{MARKER_MODULE}.Model"
    path = hostile(ckpt, tmp_path, _class_path=f"{__name__}.PaperCNNWithParts", lr=0.5, activation=named,
                   block=named, kind=named)  # fmt: skip
    cfg = configured(tmp_path, **FAST)
    with pytest.warns(UserWarning, match=r"\['activation', 'block', 'kind'\] are not applied"):
        main(["unlearn", "--config", str(cfg), "--model", f"{__name__}.PaperCNNWithParts", "--ckpt_path", str(path)])
    assert not marker_module.exists()  # and the fixture checks the module was never imported
    saved = torch.load(tmp_path / "downloaded.unlearned.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["lr"] == 0.5 and saved["activation"] is None and saved["block"] is None  # plain data applied


@pytest.mark.parametrize(
    "annotation, plain",
    [(int, True), (float | None, True), (list[str], True), (dict[str, int], True), (typing.Literal["a", 1], True),
     (typing.Any, False), (Callable, False), (type, False), (nn.Module | None, False), (list[type], False)],
)  # fmt: skip
def test_plain_annotations(annotation, plain):
    assert is_plain(annotation) is plain


def test_the_python_api_refuses_a_checkpoint_naming_another_class(fitted, tmp_path, marker_module):
    _, _, ckpt = fitted
    path = hostile(ckpt, tmp_path, _class_path=f"{MARKER_MODULE}.Model")
    callback = SharpnessAwareUnlearning(selection="last", update=FirstOrder(step_size=0.0))
    trainer = UnlearningTrainer(logger=False, callbacks=[callback], enable_progress_bar=False)
    with pytest.raises(ValueError, match="was not imported"):
        trainer.unlearn(PaperCNN(), synthetic(), ckpt_path=str(path))
    assert not marker_module.exists()


def synthetic() -> PoisonedLabelDataModule:
    return PoisonedLabelDataModule(dataset="synthetic", num_poisoned=40, synthetic_size=(600, 200))


# ---------------------------------------------------------------- 2. the run's config is one new file
def test_saving_the_config_writes_one_file_and_no_other(fitted, tmp_path):
    _, _, ckpt = fitted
    values = yaml.safe_load(configured(tmp_path, **FAST).read_text())
    data = tmp_path / "data.yaml"
    data.write_text("# the user's comments\n" + yaml.safe_dump(values.pop("data")))
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.yaml").write_text("an unrelated file\n")
    before = files(tmp_path)
    for output in (tmp_path / "out" / "unlearned.ckpt", tmp_path / "beside.ckpt"):  # the second: beside the input
        main(["unlearn", "--config", "input.yaml", "--data", "data.yaml", "--ckpt_path", str(ckpt),
              "--output_path", str(output)])  # fmt: skip
        saved = yaml.safe_load(output.with_suffix(".config.yaml").read_text())
        assert saved["data"]["init_args"]["num_poisoned"] == 40  # the sub-config inlined
    after = files(tmp_path)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == sorted(
        f"{stem}.{kind}" for stem in ("beside", "out/unlearned") for kind in ("ckpt", "config.yaml", "report.json")
    )


# ---------------------------------------------------------------- 3. a stored report is never this run's
def test_a_skipped_validation_loop_is_not_success_even_with_a_stored_report(fitted, tmp_path, capsys):
    _, _, ckpt = fitted
    cfg = configured(tmp_path, **FAST)
    first = tmp_path / "first.ckpt"
    main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_path", str(first)])
    checkpoint = torch.load(ckpt, weights_only=True)
    stored = yaml.safe_load((tmp_path / "first.report.json").read_text())
    key = next(k for k in checkpoint["callbacks"] if k.startswith("SharpnessAwareUnlearning"))
    checkpoint["callbacks"][key] = {"report": stored}
    with_report = tmp_path / "with_report.ckpt"
    torch.save(checkpoint, with_report)
    capsys.readouterr()
    before = files(tmp_path)
    with pytest.raises(RuntimeError, match="unlearning did not run"):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(with_report), "--output_path",
              str(tmp_path / "second.ckpt"), "--trainer.limit_val_batches", "0"])  # fmt: skip
    assert "<- selected" not in capsys.readouterr().out and files(tmp_path) == before


# ---------------------------------------------------------------- 5. a late failure leaves the model as it came
def test_a_failure_after_validation_restores_the_model(fitted, tmp_path, monkeypatch):
    _, _, ckpt = fitted
    model = PaperCNN()
    before = weights(model)

    def fails(self):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(OutputFiles, "commit", fails)
    callback = SharpnessAwareUnlearning(selection="last", update=FirstOrder(step_size=0.0002), harm_guard=False)
    trainer = UnlearningTrainer(logger=False, callbacks=[callback], enable_progress_bar=False)
    with pytest.raises(OSError, match="injected"):
        trainer.unlearn(model, synthetic(), ckpt_path=str(ckpt), output_path=str(tmp_path / "out.ckpt"))
    assert_same_weights(model, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 6. two runs never both win
def staged(folder: pathlib.Path, tag: str, roles=("checkpoint", "report"), overwrite=False) -> OutputFiles:
    """A run's outputs, checked and written to their temporary names (the check passed: nothing exists yet)."""
    outputs = OutputFiles(overwrite)
    for role in roles:
        outputs.add(role, folder / f"out.{role}", role)
    for role in roles:
        pathlib.Path(outputs.prepare(role)).write_text(f"{tag} {role}")
    return outputs


def test_the_run_that_publishes_second_fails_and_leaves_the_first_intact(tmp_path):
    first, second = staged(tmp_path, "first"), staged(tmp_path, "second")
    first.commit()
    with pytest.raises(FileExistsError, match="appeared while the run worked"):
        second.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "out.checkpoint": "first checkpoint",
        "out.report": "first report",
    }


def test_a_run_that_loses_a_name_midway_removes_what_it_published(tmp_path, monkeypatch):
    mine, other = staged(tmp_path, "mine"), staged(tmp_path, "other", roles=("report",))
    link = os.link

    def paused(source, target):  # this run pauses after its first name; the other run publishes meanwhile
        link(source, target)
        if target.endswith("out.checkpoint"):
            monkeypatch.setattr(os, "link", link)
            other.commit()

    monkeypatch.setattr(os, "link", paused)
    with pytest.raises(FileExistsError, match="report .* appeared while the run worked"):
        mine.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"out.report": "other report"}


def test_overwrite_still_replaces(tmp_path):
    staged(tmp_path, "first").commit()
    staged(tmp_path, "second", overwrite=True).commit()
    assert (tmp_path / "out.report").read_text() == "second report" and len(list(tmp_path.iterdir())) == 2


def test_without_hard_links_a_name_is_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    first, second = staged(tmp_path, "first"), staged(tmp_path, "second")
    first.commit()
    with pytest.raises(FileExistsError):
        second.commit()
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["first checkpoint", "first report"]


def test_only_abandoned_temporary_files_are_cleaned_up(tmp_path):
    target = tmp_path / "model.unlearned.ckpt"
    dead = os.getpid() + 1
    while True:  # a process id that runs nowhere on this host
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    live = temporary_name(str(target))  # this process's own
    own_host = temporary_name(str(target)).replace(f"-{os.getpid()}-", f"-{dead}-")
    recent = temporary_name(str(target)).replace(f"-{os.getpid()}-", f"-{dead}-")  # its writer may be on its way
    other_host = own_host.replace(f".partial-{outputs._HOST}", ".partial-elsewhere-00000000")
    earlier = temporary_name(str(target), "earlier").replace(f"-{os.getpid()}-", f"-{dead}-")  # a user's file
    unrelated = tmp_path / ".model.unlearned.partial-0123456789ab.ckpt"  # an older naming: nobody's to judge
    hour_ago = time.time() - 3600
    for path in (live, own_host, recent, other_host, earlier, unrelated):
        pathlib.Path(path).write_text("partial")
        if path != recent:
            os.utime(path, (hour_ago, hour_ago))
    assert remove_abandoned_temporaries(str(target)) == [own_host]
    OutputFiles().add("checkpoint", target, "output_path")  # the check does the same
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        os.path.basename(p) for p in (live, recent, other_host, earlier, unrelated)
    )


def test_a_failed_overwrite_puts_the_earlier_files_back(tmp_path, monkeypatch):
    staged(tmp_path, "earlier").commit()
    second = staged(tmp_path, "second", overwrite=True)
    replace = os.replace

    def fails_on_the_report(source, target):
        if target.endswith("out.report") and ".partial-" in source:
            raise OSError("disk full (injected)")
        replace(source, target)

    monkeypatch.setattr(os, "replace", fails_on_the_report)
    with pytest.raises(OSError, match="injected"):
        second.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "out.checkpoint": "earlier checkpoint",
        "out.report": "earlier report",
    }


def test_an_output_that_was_not_written_fails_the_commit(tmp_path):
    outputs = staged(tmp_path, "mine")
    os.remove(outputs.temporary("report"))
    with pytest.raises(RuntimeError, match="\\['report'\\] were not written"):
        outputs.commit()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 7. the fit path checks its outputs before training
@pytest.mark.parametrize("case", ["exists", "folder is a file"])
def test_fit_refuses_bad_outputs_before_training(tmp_path, case):
    existing = tmp_path / "report.json"
    existing.write_text("an earlier run's report")
    path = existing if case == "exists" else existing / "report.json"
    model = TinyClassifier()
    before = weights(model)
    trainer = quiet_trainer(max_epochs=1, callbacks=[SharpnessAwareUnlearning(report_path=str(path), verbose=False)])
    error = FileExistsError if case == "exists" else NotADirectoryError
    with pytest.raises(error, match="exists already" if case == "exists" else "is a file, not a folder"):
        trainer.fit(model, TensorDataModule())
    assert trainer.global_step == 0 and existing.read_text() == "an earlier run's report"
    assert_same_weights(model, before)


# ---------------------------------------------------------------- 8. a failed ddp_spawn run leaves no folders
class FailsAfterWriting(SharpnessAwareUnlearning):
    """Fails in the spawned rank 0 after its temporary files (and their new folders) were written."""

    def _write(self, trainer, pl_module, report, outputs):
        super()._write(trainer, pl_module, report, outputs)
        raise RuntimeError("injected failure after writing")


def test_a_failed_ddp_spawn_run_leaves_no_folder_behind(fitted, tmp_path):
    _, _, ckpt = fitted
    callback = FailsAfterWriting(selection="last", update=FirstOrder(step_size=0.0), progress_bar=False)
    trainer = UnlearningTrainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(Exception, match="injected failure after writing"):
        trainer.unlearn(PaperCNN(), synthetic(), ckpt_path=str(ckpt), output_path=str(tmp_path / "a" / "b" / "o.ckpt"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 9. messages that blame the right thing
def test_an_output_inside_a_file_is_refused_before_any_work(fitted, tmp_path):
    _, _, ckpt = fitted
    cfg = configured(tmp_path, **FAST)
    (tmp_path / "notes.txt").write_text("a file")
    before = files(tmp_path)
    with pytest.raises(NotADirectoryError, match="notes.txt' is a file, not a folder"):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_path",
              str(tmp_path / "notes.txt" / "out.ckpt")])  # fmt: skip
    assert files(tmp_path) == before


def test_weights_only_false_works_in_the_cli_when_the_user_asks(fitted, tmp_path):
    _, _, ckpt = fitted
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["provenance"] = fractions.Fraction(1, 3)  # an object torch.load(weights_only=True) refuses
    trusted = tmp_path / "trusted.ckpt"
    torch.save(checkpoint, trusted)
    args = ["unlearn", "--config", str(configured(tmp_path, **FAST)), "--ckpt_path", str(trusted)]
    with pytest.raises(ValueError, match="Only if you trust the file .*--weights_only false"):
        main(args)
    main([*args, "--weights_only", "false"])
    assert (tmp_path / "trusted.unlearned.ckpt").exists()


def test_a_checkpoint_saved_through_the_python_api_works_in_the_cli(fitted, tmp_path):
    _, _, ckpt = fitted
    model = PaperCNN()  # as in the README's quick start: built in Python, not by the CLI
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    api = tmp_path / "api.ckpt"
    SharpnessAwareUnlearning(selection="last", update=FirstOrder(step_size=0.0), checkpoint_path=str(api),
                             verbose=False, progress_bar=False).unlearn(model, synthetic())  # fmt: skip
    assert "_class_path" not in torch.load(api, weights_only=True)["hyper_parameters"]
    main(["unlearn", "--config", str(configured(tmp_path, **FAST)), "--ckpt_path", str(api)])
    unlearned = PaperCNN.load_from_checkpoint(tmp_path / "api.unlearned.ckpt", weights_only=True)
    assert_same_weights(unlearned, weights(model))  # step 0: the model comes back as it went in
