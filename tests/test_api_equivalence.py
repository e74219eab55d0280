"""The parts API against the old keyword API: bitwise-identical unlearned weights and the same report.

The old API's outputs were recorded before it was removed (benchmarks/results/api_equivalence_old.json,
``python benchmarks/api_equivalence.py --record old``); this reruns the synthetic cases on the new API.
"""

import importlib.util
import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("api_equivalence", ROOT / "benchmarks" / "api_equivalence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_api_reproduces_the_old_api_bitwise_on_the_synthetic_setting(tmp_path):
    script = load_script()
    record = json.loads(pathlib.Path(script.RECORD).read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(record["threads"])  # the record's reduction order
    try:
        differences = script.check(["synthetic"], str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert len(differences) == len(script.OLD_CASES) == 13
    assert all(not found for found in differences.values()), differences
