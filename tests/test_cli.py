"""`sa-unlearn`: fit, then unlearn from the checkpoint, then load the result back."""

import hashlib
import pathlib

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lightning_sa_unlearn import PoisonedLabelDataModule
from lightning_sa_unlearn.cli import console, main
from lightning_sa_unlearn.models import PaperCNN
from lightning_sa_unlearn.report import UnlearningReport

ROOT = pathlib.Path(__file__).resolve().parents[1]


def config(folder: pathlib.Path, **unlearning) -> pathlib.Path:
    values = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(folder), "filename": "fitted", "enable_version_counter": False},
                },
                {
                    "class_path": "lightning_sa_unlearn.SharpnessAwareUnlearning",
                    "init_args": {"unlearn_on_train_end": False, "progress_bar": False, **unlearning},
                },
            ],
        },
        "model": {"class_path": "lightning_sa_unlearn.models.PaperCNN"},
        "data": {
            "class_path": "lightning_sa_unlearn.PoisonedLabelDataModule",
            "init_args": {"dataset": "synthetic", "num_poisoned": 40, "synthetic_size": [600, 200]},
        },
    }
    # not config.yaml: LightningCLI saves the run's config under that name in the log folder (here the same
    # folder), and sa-unlearn refuses to replace it; the input used to be overwritten by that save
    path = folder / "input.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """LightningCLI saves config.yaml in the working folder when there is no logger: keep it out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    cfg = config(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # LightningCLI writes config.yaml into the working folder
        main(["fit", "--config", str(cfg)])
    return folder, cfg, folder / "fitted.ckpt"


def test_help_lists_unlearn(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "unlearn" in capsys.readouterr().out


def test_fit_then_unlearn_then_load_back(fitted, capsys):
    folder, cfg, ckpt = fitted
    before = digest(ckpt)
    main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    assert "<- selected" in out and "unlearned checkpoint" in out
    assert digest(ckpt) == before  # the input is never touched

    result = folder / "fitted.unlearned.ckpt"
    report = yaml.safe_load((folder / "fitted.unlearned.report.json").read_text())  # JSON is YAML
    model = PaperCNN.load_from_checkpoint(result, weights_only=True).eval()
    original = PaperCNN.load_from_checkpoint(ckpt, weights_only=True)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert changed and all(n.startswith(report["selected_layers"][0] + ".") for n in changed)

    datamodule = PoisonedLabelDataModule(dataset="synthetic", num_poisoned=40, synthetic_size=(600, 200))
    datamodule.setup("test")
    x, y = datamodule.test_set.tensors
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).double().mean().item()
    assert accuracy == pytest.approx(report["heldout_after"]["accuracy"])

    # the output carries the input's training state (moments dropped), so training resumes from it
    saved = torch.load(result, weights_only=True)
    assert saved["lightning_sa_unlearn"] == {"unlearned": True, "resumable": True}
    assert saved["epoch"] == torch.load(ckpt, weights_only=True)["epoch"]
    assert saved["optimizer_states"][0]["state"] == {} and saved["optimizer_states"][0]["param_groups"]
    first = {}

    class FirstWeights(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            first.update({n: t.detach().clone() for n, t in pl_module.state_dict().items()})

    resumed = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[FirstWeights()])  # fmt: skip
    resumed.fit(PaperCNN(), datamodule, ckpt_path=result)
    assert resumed.current_epoch == 3
    assert all(torch.equal(first[n], t) for n, t in model.state_dict().items())


def test_unlearn_under_ddp_spawn_writes_the_same_checkpoint(fitted, tmp_path):
    folder, cfg, ckpt = fitted
    single, double = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    fixed = ["--trainer.callbacks.init_args.update", "lightning_sa_unlearn.FirstOrder"]
    fixed += ["--trainer.callbacks.init_args.update.step_size", "0.0002"]
    common = ["--config", str(cfg), "--ckpt_path", str(ckpt), *fixed]
    main(["unlearn", *common, "--output_path", str(single)])
    spawned = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    try:
        main(["unlearn", *common, "--output_path", str(double), *spawned])
    except torch.multiprocessing.ProcessExitedException as error:
        # a gloo worker can still abort at its exit (SIGABRT, issue #21; processes._kept made it rarer, not gone:
        # 3 in 57 runs on 2026-12-07, on this commit and the one before). One retry; the run itself is checked.
        if "SIGABRT" not in str(error):
            raise
        main(["unlearn", *common, "--output_path", str(double), *spawned, "--overwrite", "true"])
    one, two = (torch.load(p, weights_only=True)["state_dict"] for p in (single, double))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)


def test_missing_checkpoint_is_a_clear_error(fitted):
    _, cfg, _ = fitted
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", "nowhere.ckpt"])


def without_class_path(ckpt: pathlib.Path, folder: pathlib.Path, drop_key: str | None = None) -> pathlib.Path:
    """A copy of `ckpt` without the hyperparameters that name its class, optionally missing a weight."""
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["hyper_parameters"]
    if drop_key:
        del checkpoint["state_dict"][drop_key]
    path = folder / "other.ckpt"
    torch.save(checkpoint, path)
    return path


def test_checkpoint_of_another_model_is_a_clear_error(fitted, tmp_path):
    _, cfg, ckpt = fitted
    with pytest.raises(ValueError, match="does not fit CifarResNet18.*different model class"):
        main(
            [
                "unlearn",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(without_class_path(ckpt, tmp_path)),
                "--model",
                "lightning_sa_unlearn.models.CifarResNet18",
            ]
        )


def test_checkpoint_with_missing_keys_is_a_clear_error(fitted, tmp_path):
    _, cfg, ckpt = fitted
    with pytest.raises(ValueError, match=r"missing keys \['net.fc2.bias'\]"):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(without_class_path(ckpt, tmp_path, "net.fc2.bias"))])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model.init_args.no_such_argument", "3"], "no_such_argument"),
        (["--data.init_args.num_poisoned", "many"], "num_poisoned"),
    ],
)
def test_config_errors_are_reported(fitted, capsys, arguments, message):
    _, cfg, ckpt = fitted
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), *arguments])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["mnist_targeted.yaml", "mnist_untargeted.yaml", "cifar10_resnet18.yaml", "mnist_second_order.yaml"]
)
def test_example_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "examples" / name), "--print_config"])
    assert exit_info.value.code == 0
    assert "SharpnessAwareUnlearning" in capsys.readouterr().out


def test_the_removed_benchmark_subcommand_says_where_the_experiments_went():
    with pytest.raises(SystemExit, match="benchmarks/reproduce.py"):
        main(["benchmark", "--help"])


def test_parts_are_configured_by_class_path_inside_the_callback(fitted, tmp_path):
    _, _, ckpt = fitted
    parts = {
        "curvature": {"class_path": "lightning_sa_unlearn.MonteCarloGGN", "init_args": {"samples": 300}},
        "selection": {"class_path": "lightning_sa_unlearn.LastLayer"},
        "update": {
            "class_path": "lightning_sa_unlearn.SecondOrder",
            "init_args": {
                "step_size": 1.0,
                "solver": {"class_path": "lightning_sa_unlearn.CG", "init_args": {"max_iterations": 5}},
                "fallback": True,
            },
        },
        "evaluations": ["mia", {"class_path": "lightning_sa_unlearn.RelearnAttack", "init_args": {"samples": 7}}],
        "batch_adapter": {"class_path": "lightning_sa_unlearn.BatchAdapter", "init_args": {"forward": "net"}},
        "harm_guard": False,  # the unconverged CG step costs validation accuracy, which the guard refuses
    }
    main(
        [
            "unlearn",
            "--config",
            str(config(tmp_path, **parts)),
            "--ckpt_path",
            str(ckpt),
            "--output_path",
            str(tmp_path / "out.ckpt"),
        ]
    )
    report = yaml.safe_load((tmp_path / "out.report.json").read_text())
    assert report["curvature"] == "mc_ggn" and report["curvature_samples"] == 300
    assert report["selected_layers"] == ["net.fc2"] and report["update"] == "second_order"
    assert report["solver"]["name"] == "cg" and report["solver"]["iterations"] <= 5
    assert report["relearn"]["samples"] == 7 and set(report["membership_inference"]) == {"before", "after"}


@pytest.mark.parametrize("poison", ["targeted", "untargeted", "backdoor", "deletion"])
def test_every_poison_is_accepted_by_the_cli(poison, tmp_path):
    from lightning_sa_unlearn.cli import SAUnlearnCLI, UnlearningTrainer

    args = ["--config", str(config(tmp_path)), "--data.init_args.poison", poison]
    cli = SAUnlearnCLI(trainer_class=UnlearningTrainer, args=args, run=False)
    datamodule = cli.datamodule
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.poison == poison
    assert (datamodule.corrected_dataloader() is None) == (poison == "deletion")
    assert (datamodule.triggered_test_dataloader() is not None) == (poison == "backdoor")


# ---------------------------------------------------------------- guarantees: the input and earlier files survive
FAST = dict(selection="last", update={"class_path": "lightning_sa_unlearn.FirstOrder", "init_args": {"step_size": 0.0}})


def linked(kind: str, ckpt: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    path = folder / f"{kind}.ckpt"
    (path.symlink_to if kind == "symlink" else path.hardlink_to)(ckpt)
    return path


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_an_output_path_linked_to_the_input_is_refused(fitted, tmp_path, kind):
    _, cfg, ckpt = fitted
    before = digest(ckpt)
    with pytest.raises(ValueError, match="output_path .* is the input checkpoint .*never writes over its input"):
        main(
            [
                "unlearn",
                "--config",
                str(cfg),
                "--ckpt_path",
                str(ckpt),
                "--output_path",
                str(linked(kind, ckpt, tmp_path)),
            ]
        )
    assert digest(ckpt) == before


def test_a_report_path_naming_the_input_is_refused(fitted, tmp_path):
    _, _, ckpt = fitted
    before = digest(ckpt)
    cfg = config(tmp_path, report_path=str(ckpt), **FAST)
    with pytest.raises(ValueError, match="the report .* is the input checkpoint"):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_path", str(tmp_path / "o.ckpt")])
    assert digest(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.yaml"]


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda good: b"", "is empty \\(0 bytes\\)"),
        (lambda good: good[: len(good) // 2], "is cut short"),
        (lambda good: bytes(range(256)) * 8, "is not a PyTorch checkpoint"),
    ],
    ids=["empty", "truncated", "random bytes"],
)
def test_an_unreadable_checkpoint_is_a_clear_error(fitted, tmp_path, content, message):
    _, cfg, ckpt = fitted
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content(ckpt.read_bytes()))
    before = digest(bad)
    with pytest.raises(ValueError, match=message):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(bad)])
    assert digest(bad) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]


def test_a_checkpoint_of_another_model_class_is_not_swapped_in(fitted):
    _, cfg, ckpt = fitted
    other = "lightning_sa_unlearn.models.CifarResNet18"
    refusal = f"names the class 'lightning_sa_unlearn.models.PaperCNN'.*your model is {other}"
    with pytest.raises(ValueError, match=refusal):
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), "--model", other])


def test_outputs_of_an_earlier_run_are_replaced_only_when_asked(fitted, tmp_path, capsys):
    _, _, ckpt = fitted
    output = tmp_path / "out" / "unlearned.ckpt"
    args = [
        "unlearn",
        "--config",
        str(config(tmp_path, **FAST)),
        "--ckpt_path",
        str(ckpt),
        "--output_path",
        str(output),
    ]
    main(args)
    written = sorted(p.name for p in output.parent.iterdir())
    assert written == ["unlearned.ckpt", "unlearned.config.yaml", "unlearned.report.json"]
    assert yaml.safe_load((output.parent / "unlearned.config.yaml").read_text())["ckpt_path"] == str(ckpt)
    before = {name: digest(output.parent / name) for name in written}
    with pytest.raises(FileExistsError, match="output_path .* exists already.*--overwrite true"):
        main(args)
    assert {name: digest(output.parent / name) for name in written} == before
    with pytest.raises(SystemExit) as exit_info:  # the console command: one line, no traceback
        console(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        exit_info.value.code == 1 and error.startswith("sa-unlearn: error: output_path") and "--overwrite true" in error
    )
    main([*args, "--overwrite", "true"])
    assert sorted(p.name for p in output.parent.iterdir()) == written


def test_a_failed_cli_run_leaves_nothing_behind(fitted, tmp_path, monkeypatch):
    _, _, ckpt = fitted
    before = digest(ckpt)

    def broken_plot(self, path):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(UnlearningReport, "plot", broken_plot)
    cfg = config(tmp_path, plot_path=str(tmp_path / "plot.png"), **FAST)
    with pytest.raises(RuntimeError, match="plotting failed"):  # after the checkpoint and report were written
        main(["unlearn", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_path", str(tmp_path / "o.ckpt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.yaml"] and digest(ckpt) == before


def test_fit_does_not_replace_the_config_of_an_earlier_run(fitted):
    folder, cfg, ckpt = fitted
    before = digest(folder / "config.yaml"), digest(ckpt)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        with pytest.raises(FileExistsError, match="config.yaml' exists already.*--overwrite true"):
            main(["fit", "--config", str(cfg)])
    assert (digest(folder / "config.yaml"), digest(ckpt)) == before
