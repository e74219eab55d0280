"""Evaluations: held-out metrics (always), membership inference and the relearning attack."""

from lightning_sa_unlearn.evaluations.base import Evaluation
from lightning_sa_unlearn.evaluations.heldout import HeldOutMetrics
from lightning_sa_unlearn.evaluations.membership import (
    MembershipInference,
    attack_features,
    fit_logistic_regression,
    membership_inference,
    roc_auc,
)
from lightning_sa_unlearn.evaluations.metrics import ClassificationMetrics, attack_success_rate, classification_metrics
from lightning_sa_unlearn.evaluations.relearn import RelearnAttack, first_samples, relearn_attack, relearn_evaluation

EVALUATIONS = {"mia": MembershipInference, "relearn": RelearnAttack}

__all__ = [
    "EVALUATIONS",
    "ClassificationMetrics",
    "Evaluation",
    "HeldOutMetrics",
    "MembershipInference",
    "RelearnAttack",
    "attack_features",
    "attack_success_rate",
    "classification_metrics",
    "first_samples",
    "fit_logistic_regression",
    "membership_inference",
    "relearn_attack",
    "relearn_evaluation",
    "roc_auc",
]
