"""Every committed benchmark table rebuilds byte for byte from its committed results file (``--from-json``).

Results files written before they recorded the machine take the ``Machine:`` clause of the table
next to them (benchmarks/reproduce.py, ``machine_of``); everything else comes from the JSON alone.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
TABLES = [
    "mnist_targeted",
    "mnist_targeted_random",
    "mnist_untargeted_2500",
    "mnist_untargeted_5000",
    "cifar10_cpu",
    "v0_2/mnist_targeted",
    "v0_2/cifar10_cpu",
    "v0_3/mnist_targeted",
]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reproduce():
    return load("reproduce")


@pytest.fixture(scope="module")
def robustness():
    return load("robustness")


@pytest.mark.parametrize("name", TABLES)
def test_a_committed_table_rebuilds_from_its_json(name, reproduce, tmp_path):
    reproduce.main(["--from-json", str(RESULTS / f"{name}.json"), "--out", str(tmp_path)])
    base = Path(name).name
    assert (tmp_path / f"{base}.md").read_bytes() == (RESULTS / f"{name}.md").read_bytes()
    assert (tmp_path / f"{base}.json").read_bytes() == (RESULTS / f"{name}.json").read_bytes()  # written unchanged


@pytest.mark.parametrize("folder", [RESULTS, RESULTS / "v0_2", RESULTS / "v0_3"])
def test_the_committed_robustness_table_rebuilds_from_its_json(folder, robustness, tmp_path):
    robustness.main(["--from-json", str(folder / "robustness.json"), "--out", str(tmp_path)])
    assert (tmp_path / "robustness.md").read_bytes() == (folder / "robustness.md").read_bytes()
    assert (tmp_path / "robustness.json").read_bytes() == (folder / "robustness.json").read_bytes()


def test_the_committed_backdoor_table_rebuilds_from_its_json(tmp_path):
    for version in ("v0_2", "v0_3"):
        load("backdoor").main(["--from-json", str(RESULTS / version / "backdoor.json"), "--out", str(tmp_path)])
        assert (tmp_path / "backdoor.md").read_bytes() == (RESULTS / version / "backdoor.md").read_bytes()


def test_the_machine_comes_from_the_json_or_else_from_the_table_beside_it(reproduce, tmp_path):
    machine = {"cpu_cores": 64, "torch_threads": 8, "torch": "9.9.9"}
    assert reproduce.machine_of(str(tmp_path / "x.json"), {"machine": machine}) == machine
    (tmp_path / "x.md").write_text("Setting: {}; seeds [0]. Machine: 3 CPU cores, 1 torch threads, torch 2.0.0+cpu.\n")
    assert reproduce.machine_of(str(tmp_path / "x.json"), {}) == {
        "cpu_cores": 3,
        "torch_threads": 1,
        "torch": "2.0.0+cpu",
    }
    assert reproduce.machine_of(str(tmp_path / "y.json"), {}) == reproduce.current_machine()  # no table either


def test_the_targets_of_issue_24_rebuild_from_the_committed_results(tmp_path):
    """``targets.json`` is a function of the committed results files: rebuilt from copies of them, it is the same."""
    folder = Path(__file__).parents[1] / "benchmarks" / "results" / "v0_3"
    for name in ("mnist_targeted.json", "cifar10_cpu.json", "backdoor.json", "cifar10_deletion.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, tmp_path / name)
    spec = importlib.util.spec_from_file_location("targets", folder.parents[1] / "targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    targets.main(["--out", str(tmp_path)])
    assert json.loads((tmp_path / "targets.json").read_text()) == json.loads((folder / "targets.json").read_text())


@pytest.mark.parametrize("name", ["discovery", "discovery_cifar10_cpu"])
def test_the_committed_discovery_table_and_targets_rebuild_from_their_json(name, tmp_path):
    load("discovery").main(["--from-json", str(RESULTS / "v0_3" / f"{name}.json"), "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.md").read_bytes() == (RESULTS / "v0_3" / f"{name}.md").read_bytes()
    assert (tmp_path / f"{name}.json").read_bytes() == (RESULTS / "v0_3" / f"{name}.json").read_bytes()
