"""Old API against new API: the same trained weights must give bitwise-identical unlearned weights.

    python benchmarks/api_equivalence.py --record old      # run once, before the API change
    python benchmarks/api_equivalence.py --check           # after it: compares with the record

Each case unlearns a copy of the same poisoned model (benchmark settings ``synthetic`` and
``mnist_targeted``, seed 0) and records a SHA-256 of every parameter and buffer afterwards plus
the report without its timings. The record lives in benchmarks/results/api_equivalence_old.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning_sa_unlearn.benchmarks import SETTINGS, make_datamodule, make_model, train  # noqa: E402
from lightning_sa_unlearn.callback import SharpnessAwareUnlearning  # noqa: E402
from lightning_sa_unlearn.report import _finite_or_none  # noqa: E402

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "api_equivalence_old.json")

# The old API's keyword arguments for each case (on top of the benchmark's per-setting ones).
OLD_CASES = {
    "default": {},
    "second_order": dict(update="second_order", max_iterations=30),
    "second_order_lissa_hutchinson": dict(update="second_order", solver="lissa", curvature="hutchinson", max_iterations=20),
    "forget_loss": dict(update="forget_loss", steps=5, lr=0.01),
    "fine_tune": dict(update="fine_tune"),
    "fine_tune_adam_all": dict(update="fine_tune", selection="all", optimizer="adam", lr=1e-4, include_corrected=False),
    "parameter_masks": dict(granularity="parameter", fraction=0.05, selection="sharpest", tau=0.002),
    "parameter_masks_auto_tau": dict(granularity="parameter", fraction=0.2, selection="sharpest"),
    "parameter_masks_newton": dict(granularity="parameter", fraction=0.05, selection="newton_decrement", tau=0.001),
    "newton_decrement_mc_ggn": dict(selection="newton_decrement", curvature="mc_ggn", curvature_samples=500),
    "last_fixed_tau": dict(selection="last", tau=0.0005),
    "sharpest_two_validation_and_forget": dict(selection="sharpest", num_layers=2, tau_objective="validation_and_forget"),
    "evaluations": dict(evaluate=["mia", "relearn"], mia_samples=200, relearn_samples=20),
}
SETTING_CASES = {
    "synthetic": list(OLD_CASES),
    "mnist_targeted": ["default", "second_order", "forget_loss", "fine_tune", "parameter_masks_auto_tau"],
}


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def comparable(report: dict) -> dict:
    """The report without wall-clock timings, as JSON writes it."""
    return _finite_or_none({k: v for k, v in report.items() if k != "seconds"})


def run_old(setting_name: str, case: str, cache: str) -> dict:
    setting = SETTINGS[setting_name]
    poisoned, _ = train(setting, 0, "poisoned", os.path.join(cache, setting_name, "seed0", "poisoned.pt"))
    datamodule = make_datamodule(setting, 0)
    model = make_model(setting)
    model.load_state_dict(poisoned.state_dict())
    kwargs = dict(
        curvature=setting.curvature,
        curvature_samples=setting.curvature_samples,
        damping=setting.damping,
        epochs=setting.fine_tune_epochs,
        lr=setting.fine_tune_lr,
        seed=0,
        verbose=False,
        progress_bar=False,
    )
    kwargs.update(OLD_CASES[case])
    report = SharpnessAwareUnlearning(**kwargs).unlearn(model, datamodule)
    return {"poisoned": weights_hash(poisoned), "unlearned": weights_hash(model), "report": comparable(report.to_dict())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", choices=["old"])
    parser.add_argument("--settings", nargs="+", default=list(SETTING_CASES))
    parser.add_argument("--cache", default="cache/benchmarks")
    args = parser.parse_args(argv)
    record = json.load(open(RECORD)) if os.path.exists(RECORD) else {}
    for setting_name in args.settings:
        for case in SETTING_CASES[setting_name]:
            key = f"{setting_name}/{case}"
            record[key] = run_old(setting_name, case, args.cache)
            print(key, record[key]["unlearned"][:16], record[key]["report"]["selected_layers"], flush=True)
            with open(RECORD, "w") as f:
                json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, **record}, f, indent=1)


if __name__ == "__main__":
    main()
