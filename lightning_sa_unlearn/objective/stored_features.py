"""Fine-tuning on cached features: the frozen layers below the selection run once per sample, not once per epoch.

When the model is a plain chain ``h = f_L ∘ … ∘ f_1`` (an ``nn.Sequential`` whose output is the model's) and the
selected parameters sit in ``f_k … f_L`` only, the layers ``f_1 … f_{k−1}`` are frozen and, in eval mode,
deterministic: ``a = f_{k−1} ∘ … ∘ f_1 (x)`` is computed in the first epoch and stored, and every later epoch
trains ``f_L ∘ … ∘ f_k`` on the stored ``a``. Later epochs replay the first epoch's batches, which is what the
run's map-style loaders serve again (a seeded order, the same in every pass), so the weights are the uncached
ones. Loaders that serve other samples in each pass (random augmentation, a sampler of their own) get a valid
fine-tune that differs from the uncached one: every epoch sees the first epoch's samples.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from lightning_sa_unlearn.counting import count_samples
from lightning_sa_unlearn.data import sized
from lightning_sa_unlearn.functional import LossFn, batches_for, eval_mode
from lightning_sa_unlearn.objective.losses import SampleLosses, sample_losses
from lightning_sa_unlearn.objective.traced_split import traced_split

Recorder = Callable[[str, int], None]

PROBE_SAMPLES = 64
"""Samples on which :class:`StoredFeatures` checks that the model is its chain (two extra forward passes)."""
MAX_CACHE_BYTES = 2 * 1024**3
"""Features are cached only while they fit in this many bytes; beyond it, every epoch runs the whole model."""
MAX_STORED_BYTES = 512 * 1024**2
"""What :class:`StoredFeatures` holds at most (the guard's store lives through the update, on the model's device);
beyond it, evaluations run the whole model."""


def split_below(model: nn.Module, names: Sequence[str], probe: Any) -> tuple[nn.Module, nn.Module, str] | None:
    """``(below, above, path)``: ``model(x) == above(below(x))`` with every parameter in ``names`` inside ``above``.

    An ``nn.Sequential`` chain first (:func:`_chain_split`); else the split of the traced graph
    (:func:`~lightning_sa_unlearn.objective.traced_split.traced_split`). None when neither applies.
    """
    return _chain_split(model, names, probe) or traced_split(model, names, probe)


def _chain_split(model: nn.Module, names: Sequence[str], probe: Any) -> tuple[nn.Module, nn.Module, str] | None:
    """The split at an ``nn.Sequential`` chain.

    Searches the ``nn.Sequential`` submodules of ``model`` (the model itself included) whose ``forward`` is
    ``nn.Sequential``'s own; a chain qualifies when the selection starts after its first child and its output
    on ``probe`` equals the model's, bit for bit. ``below`` and ``above`` are plain ``nn.Sequential`` holding the
    chain's own children; ``path`` names the last module of ``below``. None when no chain qualifies, or when
    running the model or the chain on ``probe`` fails (a forward that reshapes its input before the chain):
    then nothing is stored. A forward that changes the chain's output only on inputs unlike ``probe`` (a clamp
    that the probe does not reach) would pass this check: turn caching off for such a model.
    """
    if not isinstance(probe, Tensor) or not names:
        return None
    for path, chain in model.named_modules():
        if not isinstance(chain, nn.Sequential) or type(chain).forward is not nn.Sequential.forward:
            continue
        prefix = f"{path}." if path else ""
        children = list(chain.named_children())
        heads = {name[len(prefix) :].split(".")[0] for name in names if name.startswith(prefix)}
        if len(heads) == 0 or not all(name.startswith(prefix) for name in names) or not heads <= dict(children).keys():
            continue
        first = min([name for name, _ in children].index(head) for head in heads)
        if first == 0:
            return None  # the selection starts at the chain's first child: nothing below it to store
        try:
            with torch.no_grad(), eval_mode(model):
                if not torch.equal(model(probe), chain(probe)):
                    return None
        except Exception:  # the chain does not take the model's input: no split
            return None
        below, above = nn.Sequential(OrderedDict(children[:first])), nn.Sequential(OrderedDict(children[first:]))
        return below, above, prefix + children[first - 1][0]
    return None


class FeatureCache:
    """Batches of ``(below(x), y)``: computed while the first epoch reads the sources, replayed afterwards."""

    def __init__(self, below: nn.Module, sources: Sequence[Iterable[Any]]) -> None:
        self.below, self.sources = below, sources
        self.stored: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sources]
        self.bytes, self.dropped, self.closed = 0, False, False

    def first_epoch(self, source: int, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(below(x), y)`` for one batch of the first epoch, stored unless the cache grew past its limit."""
        x, y = batch
        with torch.no_grad():
            features = self.below(x)
        if not self.dropped:
            self.bytes += _bytes([(features, y)])
            if self.bytes > MAX_CACHE_BYTES:
                self.dropped, self.stored = True, [[] for _ in self.sources]
            else:
                self.stored[source].append((features, y))
        return features, y

    def epoch(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Each source's stored ``(features, labels)`` batches, in the order the first epoch read them."""
        return self.stored

    def reset(self) -> None:
        """Forget a first epoch that did not finish (a diverged trial), so that the next first epoch stores anew."""
        if not self.closed:
            self.stored, self.bytes, self.dropped = [[] for _ in self.sources], 0, False

    def close(self) -> None:
        """The first epoch is over: nothing more is stored, and an incomplete store is let go."""
        self.closed = True
        if not self.usable:
            self.stored = [[] for _ in self.sources]

    @property
    def usable(self) -> bool:
        """Every batch of every source is stored (a first epoch cut short, e.g. under DDP, left some unread)."""
        return (
            self.closed
            and not self.dropped
            and all(len(stored) == sized(source) for stored, source in zip(self.stored, self.sources))
        )


class StoredFeatures:
    """Repeated evaluations on fixed batches while only the selection moves: ``above(a)`` with ``a = below(x)`` stored.

    The step-size search evaluates ``L(θ − τ·d)`` at several τ, and the harm guard before and after the
    update, on the same samples; the layers below the selection give the same ``a`` every time, so they run
    once per set of samples (eval mode, no gradients; the search's subset again when it doubles) and each
    evaluation runs ``above`` only. :meth:`current` is False once a
    parameter or buffer below has changed since the split (a custom update may move them); callers then run
    the whole model again.
    """

    def __init__(
        self, model: nn.Module, below: nn.Module, above: nn.Module, path: str, record: Recorder | None = None
    ) -> None:
        self.model, self.below, self.above, self.path = model, below, above, path
        self.fingerprint = _fingerprint(below)
        self.bytes = 0
        if record is not None:
            count_split_passes(below, above, record)

    @classmethod
    def find(
        cls, model: nn.Module, names: Sequence[str], batches: Iterable[Any], record: Recorder | None = None
    ) -> StoredFeatures | None:
        """The split of :func:`split_below`, checked on the first :data:`PROBE_SAMPLES` samples of ``batches``; None
        where there is none. ``record(kind, samples)`` (``RunContext.count``) is told of every pass through the
        two parts."""
        probe = next((x for x, _ in batches_for(model, batches)), None)
        split = split_below(model, names, probe[:PROBE_SAMPLES] if isinstance(probe, Tensor) else probe)
        return None if split is None else cls(model, *split, record=record)

    def store(self, batches: Iterable[Any]) -> list[tuple[Tensor, Tensor]] | None:
        """``[(below(x), y)]`` for every batch; None once the stores held pass :data:`MAX_STORED_BYTES`."""
        stored: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad(), eval_mode(self.model):
            for x, y in batches_for(self.model, batches):
                stored.append((self.below(x), y))
                self.bytes += _bytes([stored[-1]])
                if self.bytes > MAX_STORED_BYTES:
                    self.release(stored)
                    return None
        return stored

    def release(self, stored: list[tuple[Tensor, Tensor]] | None) -> None:
        """A store is no longer held (replaced by a larger one): its bytes leave the count."""
        self.bytes -= _bytes(stored or [])

    def losses(self, parts: list[Iterable[Any]], stored: list[Any], loss_fn: LossFn) -> list[SampleLosses]:
        """Per-sample losses of each part: through ``above`` on its store while the layers below are
        :meth:`current`, through the whole model otherwise (no store, or something below changed)."""
        current = self.current()
        return [
            sample_losses(self.above, store, loss_fn)
            if current and store is not None
            else sample_losses(self.model, part, loss_fn)
            for part, store in zip(parts, stored)
        ]

    def current(self) -> bool:
        """Whether the parameters and buffers below are the ones at the split (same storage, same values)."""
        return _fingerprint(self.below) == self.fingerprint


def count_split_passes(below: nn.Module, above: nn.Module, record: Recorder) -> None:
    """Hooks that tell ``record`` (``RunContext.count``, the report's ``sample_passes``) of every pass through
    the two parts: ``below`` as whole-model passes, ``above`` as ``*_above``."""
    count_samples(below, record)
    count_samples(above, record, "_above")


def _bytes(stored: list[tuple[Any, Tensor]]) -> int:
    """Bytes of stored features (a tensor, or a tuple of them where a traced split stores several)."""
    return sum(t.numel() * t.element_size() for features, _ in stored for t in tree_leaves(features))


_FINGERPRINT_CHUNK = 2**22


def _fingerprint(module: nn.Module) -> list[tuple[Any, ...]]:
    """Per parameter and buffer (non-persistent ones too): storage, shape, dtype and three float64 sums of its
    values (plain, squared, position-weighted), read in chunks: what :meth:`StoredFeatures.current` compares
    instead of holding a copy of the layers below. An in-place change, through ``.data`` too, changes the sums."""
    prints = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        sums = torch.zeros(3, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
            part = flat[start : start + _FINGERPRINT_CHUNK].double()
            weights = torch.arange(start, start + part.numel(), dtype=torch.float64, device=flat.device) % 7919 + 1
            sums += torch.stack([part.sum(), part.square().sum(), (part * weights).sum()])
        prints.append((name, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, *sums.tolist()))
    return prints


class Tagged:
    """The batches of one source with the source's index, so that the first epoch knows where to store them."""

    def __init__(self, index: int, batches: Iterable[Any]) -> None:
        self.index, self.batches = index, batches

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return ((self.index, batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]
