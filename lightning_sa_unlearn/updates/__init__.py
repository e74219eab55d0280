"""Updates: how the selected parameters move (Warnecke et al.'s closed forms, forget-loss descent, fine-tuning)."""

from lightning_sa_unlearn.functional import loss_sum, mean_loss
from lightning_sa_unlearn.updates.base import (
    FixedStep,
    StepSize,
    Update,
    UpdateInputs,
    UpdateResult,
    ValidatedStep,
    ValidationSpec,
    step_size_from,
)
from lightning_sa_unlearn.updates.descent import OPTIMIZERS, fine_tune, forget_loss_descent, interleave
from lightning_sa_unlearn.updates.functional import (
    apply_first_order,
    choose_tau,
    default_forget_loss,
    default_tau_grid,
    forget_gradient,
    sum_loss,
)
from lightning_sa_unlearn.updates.gradient_steps import FineTune, FirstOrder, ForgetLossDescent, IteratedFirstOrder
from lightning_sa_unlearn.updates.second_order import CG, SECOND_ORDER_TAUS, SOLVERS, LiSSA, SecondOrder, Solver
from lightning_sa_unlearn.updates.step_then_fine_tune import DEFAULT_LRS, StepThenFineTune, default_fine_tune

UPDATES = {
    "first_order": FirstOrder,
    "second_order": SecondOrder,
    "forget_loss": ForgetLossDescent,
    "fine_tune": FineTune,
    "iterated_first_order": IteratedFirstOrder,
    "step_then_fine_tune": StepThenFineTune,
}

__all__ = [
    "CG",
    "DEFAULT_LRS",
    "OPTIMIZERS",
    "SECOND_ORDER_TAUS",
    "SOLVERS",
    "UPDATES",
    "FineTune",
    "FirstOrder",
    "FixedStep",
    "ForgetLossDescent",
    "IteratedFirstOrder",
    "LiSSA",
    "SecondOrder",
    "Solver",
    "StepSize",
    "StepThenFineTune",
    "Update",
    "UpdateInputs",
    "UpdateResult",
    "ValidatedStep",
    "ValidationSpec",
    "apply_first_order",
    "choose_tau",
    "default_fine_tune",
    "default_forget_loss",
    "default_tau_grid",
    "fine_tune",
    "forget_gradient",
    "forget_loss_descent",
    "interleave",
    "loss_sum",
    "mean_loss",
    "step_size_from",
    "sum_loss",
]
