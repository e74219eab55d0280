"""Sharpness-aware parameter selection for machine unlearning, as a PyTorch Lightning callback."""

from lightning_sa_unlearn.callback import SharpnessAwareUnlearning
from lightning_sa_unlearn.curvature import hessian_diagonal
from lightning_sa_unlearn.datamodules import PoisonedLabelDataModule
from lightning_sa_unlearn.report import UnlearningReport
from lightning_sa_unlearn.selection import layer_sharpness, select_layers
from lightning_sa_unlearn.updates import forget_gradient

__all__ = [
    "PoisonedLabelDataModule",
    "SharpnessAwareUnlearning",
    "UnlearningReport",
    "forget_gradient",
    "hessian_diagonal",
    "layer_sharpness",
    "select_layers",
]
__version__ = "0.1.0"
