"""Old API against new API: the same trained weights must give bitwise-identical unlearned weights.

    python benchmarks/api_equivalence.py --check      # compares the parts API with the record

The record was made with ``--record old`` at commit 2e20da4, on the keyword API that version 0.2 removed;
``OLD_CASES`` keeps the keywords each case used then.

Each case unlearns a copy of the same poisoned model (benchmark settings ``synthetic`` and
``mnist_targeted``, seed 0) and records a SHA-256 of every parameter and buffer afterwards plus
the report without its timings. The record lives in benchmarks/results/api_equivalence_old.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SETTINGS, make_datamodule, make_model, train  # noqa: E402

from lightning_sa_unlearn import (  # noqa: E402
    CG,
    GGN,
    AllLayers,
    FineTune,
    FirstOrder,
    FixedStep,
    Flattest,
    ForgetLossDescent,
    Hutchinson,
    LastLayer,
    LiSSA,
    MembershipInference,
    MonteCarloGGN,
    NewtonDecrement,
    RelearnAttack,
    SecondOrder,
    Sharpest,
    SharpnessAwareUnlearning,
    TopFraction,
    ValidatedStep,
)
from lightning_sa_unlearn.report import _finite_or_none  # noqa: E402

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "api_equivalence_old.json")

# The old API's keyword arguments for each case (on top of the benchmark's per-setting ones).
OLD_CASES = {
    "default": {},
    "second_order": dict(update="second_order", max_iterations=30),
    "second_order_lissa_hutchinson": dict(
        update="second_order", solver="lissa", curvature="hutchinson", max_iterations=20
    ),
    "forget_loss": dict(update="forget_loss", steps=5, lr=0.01),
    "fine_tune": dict(update="fine_tune"),
    "fine_tune_adam_all": dict(update="fine_tune", selection="all", optimizer="adam", lr=1e-4, include_corrected=False),
    "parameter_masks": dict(granularity="parameter", fraction=0.05, selection="sharpest", tau=0.002),
    "parameter_masks_auto_tau": dict(granularity="parameter", fraction=0.2, selection="sharpest"),
    "parameter_masks_newton": dict(granularity="parameter", fraction=0.05, selection="newton_decrement", tau=0.001),
    "newton_decrement_mc_ggn": dict(selection="newton_decrement", curvature="mc_ggn", curvature_samples=500),
    "last_fixed_tau": dict(selection="last", tau=0.0005),
    "sharpest_two_validation_and_forget": dict(
        selection="sharpest", num_layers=2, tau_objective="validation_and_forget"
    ),
    "evaluations": dict(evaluate=["mia", "relearn"], mia_samples=200, relearn_samples=20),
}


GRID = ValidatedStep(search="grid")  # the old API's tau="auto": every grid value on the whole validation set


def new_cases(damping: float, samples: int | None, epochs: int, lr: float) -> dict[str, dict]:
    """The same cases on the new API: parts instead of keyword arguments."""
    samples = "all" if samples is None else samples  # the old curvature_samples=None read every sample
    return {
        "default": dict(curvature=GGN(samples=samples, damping=damping), update=FirstOrder(GRID)),
        "second_order": dict(
            curvature=GGN(samples=samples, damping=damping), update=SecondOrder(GRID, solver=CG(max_iterations=30))
        ),
        "second_order_lissa_hutchinson": dict(
            curvature=Hutchinson(samples=samples, damping=damping),
            update=SecondOrder(GRID, solver=LiSSA(max_iterations=20)),
        ),
        "forget_loss": dict(
            curvature=GGN(samples=samples, damping=damping), update=ForgetLossDescent(steps=5, lr=0.01)
        ),
        "fine_tune": dict(curvature=GGN(samples=samples, damping=damping), update=FineTune(epochs=epochs, lr=lr)),
        "fine_tune_adam_all": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=AllLayers(),
            update=FineTune(epochs=epochs, lr=1e-4, optimizer="adam", include_corrected=False),
        ),
        "parameter_masks": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=TopFraction(Sharpest(), fraction=0.05),
            update=FirstOrder(FixedStep(0.002)),
        ),
        "parameter_masks_auto_tau": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=TopFraction(Sharpest(), fraction=0.2),
            update=FirstOrder(GRID),
        ),
        "parameter_masks_newton": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=TopFraction(NewtonDecrement(), fraction=0.05),
            update=FirstOrder(0.001),
        ),
        "newton_decrement_mc_ggn": dict(
            curvature=MonteCarloGGN(samples=500, damping=damping), selection=NewtonDecrement(), update=FirstOrder(GRID)
        ),
        "last_fixed_tau": dict(
            curvature=GGN(samples=samples, damping=damping), selection=LastLayer(), update=FirstOrder(0.0005)
        ),
        "sharpest_two_validation_and_forget": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=Sharpest(num_layers=2),
            update=FirstOrder(ValidatedStep(search="grid", objective="validation_and_forget")),
        ),
        "evaluations": dict(
            curvature=GGN(samples=samples, damping=damping),
            selection=Flattest(),
            update=FirstOrder(GRID),
            evaluations=[MembershipInference(samples=200), RelearnAttack(samples=20)],
        ),
    }


# Report fields that the new API renamed or computes only when a part needs them.
RENAMED = {"fine_tune_steps": "update_steps"}
NOT_NEEDED = {"fine_tune": ["newton_decrement"], "fine_tune_adam_all": ["newton_decrement"]}
# not in the old report
ADDED = {
    "evaluations",
    "curvature_stop",
    "validation_samples",
    "curvature_notes",
    "update_details",
    "update_fields",  # version 0.3: a custom part's own report fields
    "selection_fields",
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


def fingerprint(model: torch.nn.Module) -> dict[str, list]:
    """Per tensor: its sum, its sum of squares and 8 evenly spaced entries (float64), to compare within tolerance."""
    out = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        flat = tensor.detach().double().reshape(-1)
        out[name] = [
            float(flat.sum()),
            float((flat * flat).sum()),
            [float(v) for v in flat[:: max(1, flat.numel() // 8)][:8]],
        ]
    return out


def close(old: Any, new: Any, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    """Equal, with numbers equal within ``rel``/``abs_`` at any depth of lists and dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(close(old[k], new[k], rel, abs_) for k in old)
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(close(a, b, rel, abs_) for a, b in zip(old, new))
    if isinstance(old, float) or isinstance(new, float):
        if old is None or new is None:
            return old is new
        return math.isclose(old, new, rel_tol=rel, abs_tol=abs_)
    return old == new


def comparable(report: dict) -> dict:
    """The report without wall-clock timings and pass counts (added after the record), as JSON writes it."""
    return _finite_or_none({k: v for k, v in report.items() if k not in ("seconds", "sample_passes")})


MODELS = os.path.join(os.path.dirname(RECORD), "api_equivalence_models")


def poisoned_model(setting_name: str, cache: str) -> torch.nn.Module:
    """The recorded run's poisoned seed-0 model (committed: training is not bitwise reproducible across processes)."""
    path = os.path.join(cache, setting_name, "seed0", "poisoned.pt")
    committed = os.path.join(MODELS, f"{setting_name}_seed0_poisoned.pt")
    if not os.path.exists(path) and os.path.exists(committed):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(committed, path)
    return train(SETTINGS[setting_name], 0, "poisoned", path)[0]


def run_new(setting_name: str, case: str, cache: str) -> dict:
    setting = SETTINGS[setting_name]
    poisoned = poisoned_model(setting_name, cache)
    datamodule = make_datamodule(setting, 0)
    model = make_model(setting)
    model.load_state_dict(poisoned.state_dict())
    parts = new_cases(setting.damping, setting.curvature_samples, setting.fine_tune_epochs, setting.fine_tune_lr)[case]
    parts.setdefault("selection", Flattest())  # the old API's default (the default is the last layer since 0.3)
    report = SharpnessAwareUnlearning(seed=0, verbose=False, progress_bar=False, **parts).unlearn(model, datamodule)
    return {
        "poisoned": weights_hash(poisoned),
        "unlearned": weights_hash(model),
        "fingerprint": fingerprint(model),
        "report": comparable(report.to_dict()),
    }


def differences(case: str, old: dict, new: dict) -> list[str]:
    """What differs between an old and a new run of one case, beyond float tolerance (rel 1e-4).

    Version 0.2 computes both terms of the forget loss from one forward pass when their inputs are
    equal, which changes the last bits; everything else is as before. Renamed fields are mapped,
    fields the old report lacked are skipped, and so is ``newton_decrement`` where the new run no
    longer needs the whole forget gradient.
    """
    if old["poisoned"] != new["poisoned"]:
        return ["poisoned hash: not the recorded starting model"]
    if case in UNCONVERGED:
        return _unconverged_differences(old["report"], new["report"])
    found = []
    if old["unlearned"] != new["unlearned"] and not close(old["fingerprint"], new["fingerprint"]):
        found.append("unlearned weights")
    old_report = {RENAMED.get(k, k): v for k, v in old["report"].items()}
    skip = (
        set(NOT_NEEDED.get(case, []))
        | ADDED
        | ({"newton_decrement"} if not new["report"]["newton_decrement"] else set())
    )
    for key in sorted(set(old_report) | set(new["report"])):
        if key not in skip and not close(old_report.get(key), new["report"].get(key)):
            found.append(f"report.{key}: {old_report.get(key)!r} != {new['report'].get(key)!r}")
    return found


UNCONVERGED = {"second_order"}
"""CG stops at max_iterations with a residual of 0.05 (synthetic) to 0.1 (MNIST): an unconverged solve
amplifies the last-bit change of the one-pass forget loss, so only what the run decided is compared."""


def _unconverged_differences(old: dict, new: dict) -> list[str]:
    decided = {
        "selected_layers": lambda r: r["selected_layers"],
        "tau": lambda r: r["tau"],
        "solver status": lambda r: (r["solver"]["status"], r["solver"]["iterations"], r["solver"]["name"]),
    }
    return [f"{name}: {get(old)!r} != {get(new)!r}" for name, get in decided.items() if get(old) != get(new)]


def check(settings: list[str], cache: str) -> dict[str, list[str]]:
    """``{case: differences}`` of the new API against the recorded old one."""
    record = json.load(open(RECORD))
    return {
        f"{name}/{case}": differences(case, record[f"{name}/{case}"], run_new(name, case, cache))
        for name in settings
        for case in SETTING_CASES[name]
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", required=True, help="compare the new API with the record")
    parser.add_argument("--settings", nargs="+", default=list(SETTING_CASES))
    parser.add_argument("--cache", default="cache/benchmarks")
    args = parser.parse_args(argv)
    results = check(args.settings, args.cache)
    for key, found in results.items():
        print(f"{key}: {'identical' if not found else found}", flush=True)
    raise SystemExit(1 if any(results.values()) else 0)


if __name__ == "__main__":
    main()
