"""The files a run writes: checked before any work, written under temporary names, published at the end.

* A path is compared with the run's inputs by what it points to (device and inode, so symbolic and
  hard links count), never by spelling; an output that names an input is refused.
* Two outputs that name one file are refused (a path that does not exist yet is compared by its
  resolved folder and name). An output whose folder is a file, or cannot be written, is refused.
* Each file is written to a hidden temporary name in its own folder
  (``.<name>.partial-<host>-<pid>-<random><ext>``). :meth:`OutputFiles.commit` flushes every one to
  disk, then publishes them. Without ``overwrite`` a name is claimed with a primitive that fails when it
  exists (a hard link, else an ``O_EXCL`` create): if another run took one of the names since the check,
  this run removes what it had published already (only files that are still its own, by inode) and
  fails, so two runs never both "win". With ``overwrite`` an earlier file is moved aside, the new one
  renamed into place, and the earlier one put back if publishing fails.
* :meth:`OutputFiles.discard` removes the temporary files (and the folders the run created) of a failed
  run. A file the run did not write is never deleted, except temporary files of this naming whose writer
  is gone (same host, process id no longer running, untouched for :data:`ABANDONED_AFTER` seconds): a
  killed run's leftovers are removed when the next run checks the same output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_sa_unlearn.unlearned_checkpoints import mark

OVERWRITE_HINT = (
    "Delete it, choose another path, or ask to overwrite: unlearn(..., overwrite=True) on the callback or on "
    "UnlearningTrainer, callback.overwrite = True before trainer.fit, or `--overwrite true` on sa-unlearn."
)
_HOST = (
    re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:24]
    + "-"
    + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
)
"""This host in temporary names: the start of its name, and a hash of all of it (long names that share a start)."""
ABANDONED_AFTER = 15 * 60
"""Seconds since its last change after which a temporary file whose writer is gone may be removed."""


@dataclass
class _Output:
    what: str
    path: str
    temporary: str
    identity: tuple
    missing_folders: list[str] = field(default_factory=list)
    """Folders above ``path`` that did not exist when it was checked (deepest last)."""


def identity(path: str) -> tuple:
    """What ``path`` points to: ``(device, inode)`` of an existing file (links followed), else its folder and name."""
    if os.path.exists(path):
        stat = os.stat(path)
        return ("file", stat.st_dev, stat.st_ino)
    folder, name = os.path.split(os.path.abspath(path))
    return ("new", os.path.realpath(folder), name)


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` point to one file (``os.path.samefile``; False when either does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def temporary_name(path: str, kind: str = "partial") -> str:
    """The hidden temporary file ``path`` is written to: its folder, ``.<root>.partial-<host>-<pid>-<hex><ext>``.

    The extension stays last (a plot's format comes from it); host and process id say whose it is. ``kind``
    ``"earlier"`` names where an earlier file waits while ``overwrite`` publishes (never cleaned up).
    """
    folder, name = os.path.split(os.path.abspath(path))
    root, extension = os.path.splitext(name)
    return os.path.join(folder, f".{root}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}{extension}")


def remove_abandoned_temporaries(path: str) -> list[str]:
    """Remove the temporary files of ``path`` (see :func:`temporary_name`) whose writer is gone; returns them.

    Only files written on this host by a process that no longer runs, untouched for :data:`ABANDONED_AFTER`
    seconds, are removed; a live run's files, files of another host (a shared file system) and files of any
    other naming are left alone.
    """
    folder, name = os.path.split(os.path.abspath(path))
    root, extension = os.path.splitext(name)
    pattern = re.compile(rf"\.{re.escape(root)}\.partial-{re.escape(_HOST)}-(\d+)-[0-9a-f]{{12}}{re.escape(extension)}")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for candidate in names:
        match = pattern.fullmatch(candidate)
        if (
            match
            and not _running(int(match.group(1)))
            and _older_than(os.path.join(folder, candidate), ABANDONED_AFTER)
        ):
            try:
                os.remove(os.path.join(folder, candidate))
                removed.append(os.path.join(folder, candidate))
            except OSError:
                pass
    return removed


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _missing_folders(path: str) -> list[str]:
    """The folders above ``path`` that do not exist yet (outermost first); refuses a file where a folder must be."""
    folder = os.path.dirname(os.path.abspath(path))
    missing: list[str] = []
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise NotADirectoryError(
                f"{path!r} cannot be written: {folder!r} is a file, not a folder. Choose a path in a folder."
            )
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{path!r} cannot be written: the folder {folder!r} is not writable. Choose another path."
        )
    return missing[::-1]


class OutputFiles:
    """The outputs of one run, by role (``"checkpoint"``, ``"report"``, ``"plot"``, ``"config"``).

    Args:
        overwrite: replace files that exist already (default: refuse them before any work).
        inputs: ``{description: path}`` of files the run reads; no output may be one of them.
    """

    def __init__(self, overwrite: bool = False, inputs: dict[str, str | None] | None = None) -> None:
        self.overwrite = overwrite
        self.inputs = {what: os.fspath(p) for what, p in (inputs or {}).items() if p and os.path.isfile(p)}
        self.files: dict[str, _Output] = {}
        self._created: list[str] = []

    def add(self, role: str, path: str | os.PathLike, what: str) -> None:
        """Check ``path`` (called ``what`` in messages) and register it as the output ``role``; raises when refused."""
        path = os.fspath(path)
        for description, source in self.inputs.items():
            if same_file(path, source):
                raise ValueError(
                    f"{what} {path!r} is {description} {source!r} (the same file, through a link or another "
                    "spelling); the run never writes over its input. Choose a new file."
                )
        if os.path.isdir(path):
            raise IsADirectoryError(f"{what} {path!r} is a folder; give the path of a file.")
        missing = _missing_folders(path)
        key = identity(path)
        for other in self.files.values():
            if other.identity == key:
                raise ValueError(
                    f"{what} {path!r} and {other.what} {other.path!r} name the same file; give each output its own."
                )
        if os.path.lexists(path) and not self.overwrite:
            raise FileExistsError(
                f"{what} {path!r} exists already (from an earlier run?); nothing was changed. {OVERWRITE_HINT}"
            )
        if not missing:
            remove_abandoned_temporaries(path)
        self.files[role] = _Output(what, path, temporary_name(path), key, missing)

    def __contains__(self, role: str) -> bool:
        return role in self.files

    def path(self, role: str) -> str:
        return self.files[role].path

    def temporary(self, role: str) -> str:
        return self.files[role].temporary

    def prepare(self, role: str) -> str:
        """The temporary path to write ``role`` to, its folder created (and remembered for :meth:`discard`)."""
        temporary = self.files[role].temporary
        for folder in _missing_folders(temporary):
            os.mkdir(folder)
            self._created.append(folder)
        return temporary

    def commit(self) -> None:
        """Flush every temporary file to disk, then publish them all, or none (see the module's rules).

        Every registered output must have been written: one that was not fails the commit, which publishes
        nothing. Under ``overwrite`` an earlier file is moved aside first and put back if the commit fails.
        """
        missing = [output.what for output in self.files.values() if not os.path.exists(output.temporary)]
        if missing:
            self.discard()
            raise RuntimeError(f"{missing} were not written (their temporary files are gone); nothing was published.")
        for output in self.files.values():
            _fsync(output.temporary, required=True)
        published: list[tuple[str, tuple[int, int], str | None]] = []  # path, this run's inode, the earlier file
        try:
            for output in self.files.values():
                stat = os.stat(output.temporary)
                earlier = None
                if self.overwrite and os.path.lexists(output.path):
                    earlier = temporary_name(output.path, "earlier")
                    os.replace(output.path, earlier)
                published.append((output.path, (stat.st_dev, stat.st_ino), earlier))
                if self.overwrite:
                    os.replace(output.temporary, output.path)
                else:
                    _publish_exclusive(output)
        except BaseException:
            for path, inode, earlier in reversed(published):  # undo: only files that are still this run's own
                try:
                    stat = os.stat(path)
                    if (stat.st_dev, stat.st_ino) == inode:
                        os.remove(path)
                except OSError:
                    pass
                if earlier is not None and os.path.lexists(earlier):
                    os.replace(earlier, path)
            self.discard()
            raise
        for _, _, earlier in published:
            if earlier is not None:
                os.remove(earlier)
        folders = {os.path.dirname(os.path.abspath(output.path)) for output in self.files.values()}
        folders |= {os.path.dirname(folder) for folder in self._created}  # new folders' entries in their parents
        for folder in folders:
            _fsync(folder, required=False)

    def discard(self) -> None:
        """Remove this run's temporary files and the folders it created (if empty); nothing else.

        Folders that were missing when the outputs were checked count as created by this run, also when
        another process (a ``ddp_spawn`` worker) created them.
        """
        for output in self.files.values():
            if os.path.exists(output.temporary):
                os.remove(output.temporary)
        folders = list(self._created) + [f for output in self.files.values() for f in output.missing_folders]
        for folder in sorted(set(folders), key=len, reverse=True):  # deepest first
            try:
                os.rmdir(folder)
            except OSError:
                pass
        self._created = []


def _publish_exclusive(output: _Output) -> None:
    """Give the temporary file its final name only if that name is free (atomically); else FileExistsError."""
    taken = FileExistsError(
        errno.EEXIST,
        f"{output.what} {output.path!r} appeared while the run worked (another run?); this run published nothing. "
        f"{OVERWRITE_HINT}",
    )
    try:
        os.link(output.temporary, output.path)
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links here (some network or FAT file systems): claim the name, then fill it
        try:
            descriptor = os.open(output.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise taken from None
        claim = os.fstat(descriptor)
        os.close(descriptor)
        try:
            os.replace(output.temporary, output.path)
        except BaseException:  # remove the empty claim, if it is still ours
            if os.path.exists(output.path) and os.stat(output.path).st_ino == claim.st_ino:
                os.remove(output.path)
            raise
        return
    os.remove(output.temporary)


def _fsync(path: str, required: bool) -> None:
    """``fsync`` a written file (``required``: a published name never points to data still in memory), or a
    folder, so that its new names survive a power cut (not possible on every file system: then skipped)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        if required:
            raise


def fitted_checkpoints(trainer: pl.Trainer) -> dict[str, str | None]:
    """The checkpoints the model was loaded from or saved to: no output may replace them."""
    found: dict[str, str | None] = {"the checkpoint the trainer loaded": getattr(trainer, "ckpt_path", None)}
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        for attribute in ("best_model_path", "last_model_path"):
            found[f"{type(callback).__name__}.{attribute}"] = getattr(callback, attribute, None)
    return found


def planned_outputs(trainer: pl.Trainer, paths: dict[str, str | None], overwrite: bool) -> OutputFiles:
    """``{role: path}`` checked as a run's outputs (none with ``fast_dev_run``, which writes nothing)."""
    outputs = OutputFiles(overwrite, fitted_checkpoints(trainer))
    if trainer.fast_dev_run:
        if any(paths.values()):
            rank_zero_info("fast_dev_run: the report, plot and unlearned checkpoint are not written.")
        return outputs
    for role, path in paths.items():
        if path:
            outputs.add(role, path, f"{role}_path")
    return outputs


def write_files(outputs: OutputFiles, report: Any, weights: tuple[nn.Module, dict[str, Any]] | None) -> None:
    """Write the report, the plot and, with ``weights`` (the module and its callbacks' states), the weights-only
    checkpoint to their temporary names."""
    if "checkpoint" in outputs and weights is not None:
        save_checkpoint(weights[0], outputs.prepare("checkpoint"), callbacks=weights[1])
    if "report" in outputs:
        report.to_json(outputs.prepare("report"))
    if "plot" in outputs:
        report.plot(outputs.prepare("plot"))


def save_checkpoint(pl_module: nn.Module, path: str, callbacks: dict[str, Any] | None = None) -> None:
    """Save the unlearned model (weights and hyperparameters) so that ``load_from_checkpoint`` reads it.

    ``callbacks``: ``{state_key: state}`` of callbacks, as Lightning stores them; with the unlearning callback's,
    ``fit(ckpt_path=...)`` on this file reaches its ``on_load_checkpoint``, which says why it cannot resume.
    """
    checkpoint = {"state_dict": pl_module.state_dict(), "pytorch-lightning_version": pl.__version__}
    if isinstance(pl_module, pl.LightningModule):
        checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
    if callbacks:
        checkpoint["callbacks"] = callbacks
    mark(checkpoint)  # weights only: fit(ckpt_path=...) on it is refused with a message that says why
    torch.save(checkpoint, path)
