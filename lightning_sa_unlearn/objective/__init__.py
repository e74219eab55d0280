"""The validation objective every validated choice reads (the step-size search, trial selection, the harm guard):
the data chosen once (:mod:`.validation`), per-sample losses and paired standard errors (:mod:`.losses`), and the
stored outputs of the frozen layers below the selection (:mod:`.stored_features`)."""

from lightning_sa_unlearn.objective.losses import (
    SampleLosses,
    mean_change,
    moments,
    paired_moments,
    paired_standard_error,
    per_sample_loss,
    sample_losses,
    standard_error,
)
from lightning_sa_unlearn.objective.stored_features import FeatureCache, StoredFeatures, split_below
from lightning_sa_unlearn.objective.validation import RETAIN_SLICE, ValidationObjective, choose_validation

__all__ = [
    "RETAIN_SLICE",
    "FeatureCache",
    "SampleLosses",
    "StoredFeatures",
    "ValidationObjective",
    "choose_validation",
    "mean_change",
    "moments",
    "paired_moments",
    "paired_standard_error",
    "per_sample_loss",
    "sample_losses",
    "split_below",
    "standard_error",
]
