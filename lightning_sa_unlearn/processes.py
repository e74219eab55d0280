"""Agreement and reduction across processes, through Lightning's strategy (no distributed layer of our own).

With one process every method is the identity.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
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
        if self.world_size == 1:
            return value
        with _peer_failures():
            return _kept(self.strategy.reduce(value.to(self.device), reduce_op="sum"))

    def mean(self, total: float, count: float) -> float:
        """``Σ total / Σ count`` over the processes (NaN when no process counted anything)."""
        total, count = self.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return total / count if count else float("nan")

    def min(self, value: int) -> int:
        if self.world_size == 1:
            return value
        with _peer_failures():
            return int(_kept(self.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="min")))

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
        if self.world_size == 1:
            return obj
        with _peer_failures():
            return self.strategy.broadcast(obj)

    def on_rank_zero(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on rank 0 alone and hand its result to every process (a failure fails every process)."""
        return self.broadcast(self.agree(lambda: work() if self.rank == 0 else None))

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
            raise RuntimeError(PEER_FAILED)
        return result


class SummedState:
    """Named float64 tensors that add up across processes, their reduction declared once (as torchmetrics'
    ``add_state(..., dist_reduce_fx="sum")``): add to them locally, then :meth:`sync` sums each over every
    process, all in one collective."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}

    def add_state(self, name: str, shape: tuple[int, ...] = (1,)) -> Tensor:
        """Declare ``name``, zeros of ``shape``, summed across processes; returns it (to fill in place)."""
        self.state[name] = torch.zeros(shape, dtype=torch.float64)
        return self.state[name]

    def sync(self, processes: Processes) -> None:
        """Replace every state by its sum over the processes (on the CPU); with one process nothing changes."""
        self.state = {name: total.cpu() for name, total in processes.sum_tree(self.state).items()}


_RECENT_COLLECTIVES: collections.deque[Tensor] = collections.deque(maxlen=4)
KEPT_MAX_ELEMENTS = 4096


def _kept(reduced: Tensor) -> Tensor:
    """Hold the tensor of one of the last few collectives in Python until the next ones replace it.

    Workaround for an abort at the exit of a ``ddp_spawn`` worker (``terminate called without an active
    exception``, SIGABRT, about 1 run in 25 under load; issue #21). gloo's worker thread drops its reference
    to a finished all-reduce a little after ``wait()`` returns. If Python has dropped its own reference to
    the tensor by then, that drop frees the tensor's Python object, which needs the GIL; when the worker
    process is already in ``Py_FinalizeEx``, taking the GIL ends the thread with ``pthread_exit``, whose
    unwinding through a ``noexcept`` destructor calls ``std::terminate`` (seen in a core dump: the last
    collective is the ``agree`` at the end of a run). With Python still holding the tensor, gloo's drop
    frees nothing. (Destroying the process group at exit does not help: its threads outlive the call.) Only
    small tensors (the agreements and sums that end a run), and only under gloo, so that no gradient-sized
    buffer is held.
    """
    if reduced.numel() <= KEPT_MAX_ELEMENTS and torch.distributed.get_backend() == "gloo":
        _RECENT_COLLECTIVES.append(reduced)
    return reduced


PEER_FAILED = "another process failed while unlearning (its error is in its log); the weights were restored."
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


@contextlib.contextmanager
def _peer_failures() -> Iterator[None]:
    """A collective that fails because another process is gone says so, instead of gloo's socket error."""
    try:
        yield
    except RuntimeError as error:
        lost = isinstance(error, getattr(torch.distributed, "DistNetworkError", ())) or any(
            text in str(error) for text in _LOST_PEER
        )
        if lost:
            raise RuntimeError(f"{PEER_FAILED} (Here: {str(error).splitlines()[0]})") from error
        raise
