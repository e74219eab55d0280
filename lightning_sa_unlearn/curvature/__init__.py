"""Curvature: the diagonal of the training loss's Hessian at the trained weights (paper section 4.1)."""

from lightning_sa_unlearn.curvature.confidence import (
    SharpnessStatistics,
    selection_margin,
    sharpness_with_standard_errors,
)
from lightning_sa_unlearn.curvature.estimators import (
    CURVATURES,
    GGN,
    Curvature,
    CurvatureResult,
    EmpiricalFisher,
    ExactHessian,
    Hutchinson,
    MonteCarloGGN,
    default_curvature,
)
from lightning_sa_unlearn.curvature.functional import (
    CURVATURE_METHODS,
    EXACT_MAX_PARAMETERS,
    hessian_diagonal,
    hessian_diagonal_sum,
    sum_over_batches,
)

__all__ = [
    "CURVATURES",
    "CURVATURE_METHODS",
    "EXACT_MAX_PARAMETERS",
    "GGN",
    "Curvature",
    "CurvatureResult",
    "EmpiricalFisher",
    "ExactHessian",
    "Hutchinson",
    "MonteCarloGGN",
    "SharpnessStatistics",
    "default_curvature",
    "hessian_diagonal",
    "hessian_diagonal_sum",
    "selection_margin",
    "sharpness_with_standard_errors",
    "sum_over_batches",
]
