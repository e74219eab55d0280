"""Curvature and unlearning seconds with 1 and 2 CPU processes, through `sa-unlearn`.

    python benchmarks/ddp_curvature.py            # writes benchmarks/results/ddp_curvature.{md,json}

Fits PaperCNN on MNIST with examples/mnist_targeted.yaml (once; the checkpoint is reused), then
runs `sa-unlearn unlearn` on that checkpoint with `--trainer.devices 1` and with
`--trainer.devices 2 --trainer.strategy ddp`, and reads the stage seconds from each report. Both
runs use the same 50,000 curvature samples, so the results must agree; the seconds show what a
second process buys on this machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "mnist_targeted.yaml"
OUT = ROOT / "outputs" / "mnist_targeted"
RESULTS = ROOT / "benchmarks" / "results"


def sa_unlearn(*args: str) -> str:
    command = [sys.executable, "-m", "lightning_sa_unlearn.cli", *args, "--config", str(CONFIG)]
    print("$", " ".join(command[2:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return done.stdout


def main() -> None:
    fitted = OUT / "fitted.ckpt"
    if not fitted.exists():
        sa_unlearn("fit")
    runs = {}
    for processes, extra in ((1, []), (2, ["--trainer.strategy", "ddp"])):
        output = OUT / f"unlearned_{processes}p.ckpt"
        stdout = sa_unlearn(
            "unlearn",
            "--ckpt_path",
            str(fitted),
            "--output_path",
            str(output),
            "--trainer.devices",
            str(processes),
            *extra,
        )
        report = json.loads(output.with_suffix(".report.json").read_text())
        runs[processes] = {
            "seconds": report["seconds"],
            "selected_layers": report["selected_layers"],
            "tau": report["tau"],
            "heldout_after": report["heldout_after"]["accuracy"],
            "curvature_samples": report["curvature_samples"],
            "stdout": stdout,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ddp_curvature.json").write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2))
    lines = [
        "# Curvature and unlearning seconds, 1 vs 2 CPU processes",
        "",
        "Command: `python benchmarks/ddp_curvature.py` (PaperCNN, MNIST, `examples/mnist_targeted.yaml`, "
        f"GGN on {runs[1]['curvature_samples']:,} samples; machine: {os.cpu_count()} CPU cores, gloo).",
        "",
        "| processes | curvature s | forget gradient s | update s | evaluation s | total s | selected | tau "
        "| held-out acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for processes, run in runs.items():
        s = run["seconds"]
        lines.append(
            f"| {processes} | {s['curvature']:.1f} | {s['forget_gradient']:.2f} | {s['update']:.1f} | "
            f"{s['evaluation']:.1f} | {s['total']:.1f} | {', '.join(run['selected_layers'])} | {run['tau']:.4g} | "
            f"{100 * run['heldout_after']:.2f}% |"
        )
    ratio = runs[1]["seconds"]["curvature"] / runs[2]["seconds"]["curvature"]
    lines += [
        "",
        f"Curvature speed-up with 2 processes: {ratio:.2f}x.",
        "",
        "Output of the 1-process `sa-unlearn unlearn`:",
        "",
        "```",
        runs[1]["stdout"].strip(),
        "```",
    ]
    (RESULTS / "ddp_curvature.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
