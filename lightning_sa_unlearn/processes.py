"""Agreement and reduction across processes, through Lightning's strategy (no distributed layer of our own).

With one process every method is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor


class Processes:
    """Sums, broadcasts, and agreement on failure, for the processes of ``trainer``'s strategy."""

    def __init__(self, trainer: pl.Trainer, device: torch.device) -> None:
        self.strategy, self.device = trainer.strategy, device
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        if self.world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"the trainer has {self.world_size} processes but no process group is running. Under DDP, "
                "attach the callback to trainer.fit, or use `sa-unlearn unlearn`, so that it runs in every process."
            )

    def sum(self, value: Tensor) -> Tensor:
        return self.strategy.reduce(value.to(self.device), reduce_op="sum") if self.world_size > 1 else value

    def min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        return int(self.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="min"))

    def sum_tree(self, tree: dict[str, Tensor]) -> dict[str, Tensor]:
        """All-reduce a dict of tensors with one collective (flattened into one buffer)."""
        if self.world_size == 1:
            return tree
        flat = self.sum(torch.cat([t.reshape(-1) for t in tree.values()]))
        out, start = {}, 0
        for name, t in tree.items():
            out[name] = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        return out

    def broadcast(self, obj: Any) -> Any:
        return self.strategy.broadcast(obj) if self.world_size > 1 else obj

    def agree(self, work: Callable[[], Any]) -> Any:
        """Run local ``work``; if it fails on any process, every process raises (none waits forever)."""
        if self.world_size == 1:
            return work()
        error: BaseException | None = None
        try:
            result = work()
        except Exception as caught:  # re-raised below, after the other processes have heard of it
            error, result = caught, None
        failures = self.sum(torch.tensor([float(error is not None)], dtype=torch.float64))
        if error is not None:
            raise error
        if failures.item() > 0:
            raise RuntimeError(
                "another process failed while unlearning (its error is in its log); the weights were restored."
            )
        return result
