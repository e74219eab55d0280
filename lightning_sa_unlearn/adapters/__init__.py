"""Batch adapters: how batches become ``(inputs, targets)`` and inputs become logits."""

from lightning_sa_unlearn.adapters.adapter import BATCH_ADAPTERS, OUTPUT_LAYOUTS, BatchAdapter
from lightning_sa_unlearn.adapters.view import AdaptedModule

__all__ = ["BATCH_ADAPTERS", "OUTPUT_LAYOUTS", "AdaptedModule", "BatchAdapter"]
