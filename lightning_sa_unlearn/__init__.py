"""Sharpness-aware parameter selection for machine unlearning, as a PyTorch Lightning callback.

The callback is built from four kinds of parts, one subpackage each: :mod:`.curvature`,
:mod:`.selection`, :mod:`.updates` (with step sizes and solvers) and :mod:`.evaluations`.
"""

from lightning_sa_unlearn.adapters import BatchAdapter
from lightning_sa_unlearn.callback import SharpnessAwareUnlearning
from lightning_sa_unlearn.curvature import (
    GGN,
    Curvature,
    EmpiricalFisher,
    ExactHessian,
    Hutchinson,
    MonteCarloGGN,
    hessian_diagonal,
)
from lightning_sa_unlearn.datamodules import PoisonedLabelDataModule
from lightning_sa_unlearn.discovery import ExtendedForgetData, Suspects, rank_suspects
from lightning_sa_unlearn.evaluations import Evaluation, HeldOutMetrics, MembershipInference, RelearnAttack
from lightning_sa_unlearn.guard import HarmfulUpdateError, paired_standard_error
from lightning_sa_unlearn.pipeline import UnlearningRun
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.selection import (
    AllLayers,
    Flattest,
    LastLayer,
    Layers,
    Measurements,
    NewtonDecrement,
    Selected,
    Selection,
    Sharpest,
    TopFraction,
    ValidatedLayer,
    layer_sharpness,
    select_layers,
)
from lightning_sa_unlearn.updates import (
    CG,
    FineTune,
    FirstOrder,
    FixedStep,
    ForgetLossDescent,
    IteratedFirstOrder,
    LiSSA,
    SecondOrder,
    Solver,
    StepSize,
    StepThenFineTune,
    Update,
    UpdateResult,
    ValidatedStep,
    forget_gradient,
)

__all__ = [
    "CG",
    "BatchAdapter",
    "GGN",
    "AllLayers",
    "Curvature",
    "EmpiricalFisher",
    "Evaluation",
    "ExactHessian",
    "ExtendedForgetData",
    "FineTune",
    "IteratedFirstOrder",
    "FirstOrder",
    "FixedStep",
    "Flattest",
    "ForgetLossDescent",
    "HarmfulUpdateError",
    "HeldOutMetrics",
    "Hutchinson",
    "LastLayer",
    "Layers",
    "LiSSA",
    "Measurements",
    "MembershipInference",
    "MonteCarloGGN",
    "NewtonDecrement",
    "PoisonedLabelDataModule",
    "RelearnAttack",
    "SecondOrder",
    "Selected",
    "Selection",
    "SharpnessAwareUnlearning",
    "Sharpest",
    "Solver",
    "StepSize",
    "StepThenFineTune",
    "Suspects",
    "TopFraction",
    "UnlearningReport",
    "UnlearningRun",
    "Update",
    "UpdateResult",
    "ValidatedLayer",
    "ValidatedStep",
    "forget_gradient",
    "hessian_diagonal",
    "layer_sharpness",
    "paired_standard_error",
    "rank_suspects",
    "select_layers",
]
__version__ = "0.3.0.dev0"
