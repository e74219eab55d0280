"""The files a run writes: checked before any work, written under temporary names, put in place at the end.

* A path is compared with the run's inputs by what it points to (device and inode, so symbolic and
  hard links count), never by spelling; an output that names an input is refused.
* Two outputs that name one file are refused (a path that does not exist yet is compared by its
  resolved folder and name).
* A file that exists already (from an earlier run) is replaced only when the user asks to overwrite.
* Each file is written to a hidden temporary name in its own folder and renamed into place by
  :meth:`OutputFiles.commit`, after the whole run succeeded; :meth:`OutputFiles.discard` removes the
  temporary files (and the folders it created) of a failed run. A file the run did not write is never
  deleted.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn

OVERWRITE_HINT = (
    "Delete it, choose another path, or ask to overwrite: unlearn(..., overwrite=True) on the callback or on "
    "UnlearningTrainer, callback.overwrite = True before trainer.fit, or `--overwrite true` on sa-unlearn."
)


@dataclass
class _Output:
    what: str
    path: str
    temporary: str
    identity: tuple


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
        folder, name = os.path.split(os.path.abspath(path))
        root, extension = os.path.splitext(name)  # the extension stays last: a plot's format comes from it
        temporary = os.path.join(folder, f".{root}.partial-{uuid.uuid4().hex[:12]}{extension}")
        self.files[role] = _Output(what, path, temporary, key)

    def __contains__(self, role: str) -> bool:
        return role in self.files

    def path(self, role: str) -> str:
        return self.files[role].path

    def temporary(self, role: str) -> str:
        return self.files[role].temporary

    def prepare(self, role: str) -> str:
        """The temporary path to write ``role`` to, its folder created (and remembered for :meth:`discard`)."""
        temporary = self.files[role].temporary
        folder = os.path.dirname(temporary)
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
        for created in reversed(missing):
            os.mkdir(created)
            self._created.append(created)
        return temporary

    def commit(self) -> None:
        """Rename every written temporary file into place (replacing an existing file only under ``overwrite``)."""
        written = [output for output in self.files.values() if os.path.exists(output.temporary)]
        for output in written:
            if not self.overwrite and os.path.lexists(output.path):  # appeared while the run worked
                raise FileExistsError(f"{output.what} {output.path!r} appeared while the run worked. {OVERWRITE_HINT}")
        for output in written:
            os.replace(output.temporary, output.path)

    def discard(self) -> None:
        """Remove this run's temporary files and the folders it created (if empty); nothing else."""
        for output in self.files.values():
            if os.path.exists(output.temporary):
                os.remove(output.temporary)
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                pass
        self._created = []


def fitted_checkpoints(trainer: pl.Trainer) -> dict[str, str | None]:
    """The checkpoints the model was loaded from or saved to: no output may replace them."""
    found: dict[str, str | None] = {"the checkpoint the trainer loaded": getattr(trainer, "ckpt_path", None)}
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        for attribute in ("best_model_path", "last_model_path"):
            found[f"{type(callback).__name__}.{attribute}"] = getattr(callback, attribute, None)
    return found


def save_checkpoint(pl_module: nn.Module, path: str) -> None:
    """Save the unlearned model (weights and hyperparameters) so that ``load_from_checkpoint`` reads it."""
    checkpoint = {"state_dict": pl_module.state_dict(), "pytorch-lightning_version": pl.__version__}
    if isinstance(pl_module, pl.LightningModule):
        checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = dict(pl_module.hparams)
    torch.save(checkpoint, path)
