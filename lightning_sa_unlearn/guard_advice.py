"""What to change when the harm guard refuses an update: hints for the built-in updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sa_unlearn.updates import Update


def advice(update: Update, outcome: dict[str, Any]) -> str:
    """What to change, for the built-in updates (a generic hint for others)."""
    from lightning_sa_unlearn.updates import (
        FineTune,
        FirstOrder,
        FixedStep,
        ForgetLossDescent,
        SecondOrder,
        ValidatedStep,
    )

    hints: list[str] = []
    solver = outcome.get("solver") or {}
    if solver.get("status") == "max_iterations":
        hints.append(
            f"The {solver.get('name')} solve stopped at max_iterations with relative residual "
            f"{solver.get('relative_residual', float('nan')):.3g}: raise the solver's max_iterations or the "
            "curvature's damping."
        )
    if isinstance(update, (FirstOrder, SecondOrder)):
        step = update.step_size
        if isinstance(step, FixedStep):
            hints.append(
                f"Lower the fixed step (tau={step.tau:g}), or let it be chosen on validation (step_size=None)."
            )
        elif isinstance(step, ValidatedStep) and step.grid is not None and 0.0 not in step.grid:
            hints.append(f"Add 0 (no update) to the step-size grid {step.grid}, or use the default grid (grid=None).")
        else:
            hints.append("Use a smaller step size.")
    elif isinstance(update, FineTune):
        hints.append(f"Lower FineTune's lr ({update.lr:g}) or epochs ({update.epochs}).")
    elif isinstance(update, ForgetLossDescent):
        hints.append(
            f"Lower ForgetLossDescent's lr ({update.lr:g}) or steps ({update.steps}); with val_dataloader() it "
            "also stops at its best step."
        )
    else:
        hints.append(f"Make {type(update).__name__}'s step smaller.")
    return " ".join(hints)
