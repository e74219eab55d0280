"""Selection: which layers, or which entries, the update may move (paper section 4.1)."""

from lightning_sa_unlearn.selection.functional import (
    SELECTION_RULES,
    entry_decrement,
    layer_sharpness,
    newton_decrement,
    select_layers,
    top_fraction,
    trainable_layers,
)
from lightning_sa_unlearn.selection.rules import (
    SELECTIONS,
    AllLayers,
    Flattest,
    LastLayer,
    Layers,
    Measurements,
    NewtonDecrement,
    RankingRule,
    Selected,
    Selection,
    Sharpest,
    TopFraction,
    ValidatedLayer,
)

__all__ = [
    "SELECTIONS",
    "SELECTION_RULES",
    "AllLayers",
    "Flattest",
    "LastLayer",
    "Layers",
    "Measurements",
    "NewtonDecrement",
    "RankingRule",
    "Selected",
    "Selection",
    "Sharpest",
    "TopFraction",
    "ValidatedLayer",
    "entry_decrement",
    "layer_sharpness",
    "newton_decrement",
    "select_layers",
    "top_fraction",
    "trainable_layers",
]
