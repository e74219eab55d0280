"""Reading a fitted checkpoint as data: clear errors for bad files, and nothing it names is ever imported.

A Lightning checkpoint may name classes: ``hyper_parameters["_class_path"]`` (LightningCLI saves it),
a ``class_path`` key, or nested ``{"class_path": ...}`` values. Importing such a name runs the module's
code (a ``.py`` file shipped beside a downloaded checkpoint is importable from the working folder), and
building it runs the class's ``__init__``. Here the user's config or code decides the class; the names
in a checkpoint are compared with it as strings, and a checkpoint that names another class is refused.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing
import zipfile
from typing import Any

import torch

CLASS_KEYS = ("_class_path", "class_path")
"""Hyperparameter keys that name a class; they are compared, never imported."""
LIGHTNING_KEYS = ("_instantiator",)
"""Hyperparameter keys LightningCLI adds for itself (not arguments of the model)."""


def read_checkpoint(ckpt_path: str, weights_only: bool = True, trust_hint: str = "weights_only=False") -> dict:
    """The checkpoint's contents, or a clear error for a file that is empty, cut short or not a checkpoint.

    ``trust_hint`` is how the caller's user turns ``weights_only`` off (``--weights_only false`` in the CLI).
    """
    size = os.path.getsize(ckpt_path)
    if size == 0:
        raise ValueError(f"checkpoint {ckpt_path!r} is empty (0 bytes); was it written completely?")
    with open(ckpt_path, "rb") as f:
        start = f.read(4)
    archive = start == b"PK\x03\x04"  # torch.save writes a zip archive (older versions: a pickle, b"\x80...")
    if not archive and not start.startswith(b"\x80"):
        raise ValueError(
            f"{ckpt_path!r} ({size:,} bytes) is not a PyTorch checkpoint: it does not start like one. Pass the "
            ".ckpt file that `sa-unlearn fit` (ModelCheckpoint) wrote."
        )
    if archive and not zipfile.is_zipfile(ckpt_path):
        raise ValueError(
            f"checkpoint {ckpt_path!r} ({size:,} bytes) is cut short: its zip archive has no end. Was it copied or "
            "written completely?"
        )
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        if archive and weights_only and "Weights only load failed" in str(error):
            raise ValueError(
                f"checkpoint {ckpt_path!r} holds objects that torch.load(weights_only=True) refuses: loading them "
                f"runs code the file names. Only if you trust the file and where it came from, pass {trust_hint}."
            ) from error
        raise ValueError(
            f"checkpoint {ckpt_path!r} ({size:,} bytes) cannot be read as a PyTorch checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). It may be truncated or "
            "not a checkpoint at all; pass the .ckpt file that `sa-unlearn fit` (ModelCheckpoint) wrote."
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict').")
    return checkpoint


def class_path_of(cls: type) -> str:
    """``module.QualifiedName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def names_class(saved: str, cls: type) -> bool:
    """Whether the dotted name ``saved`` names ``cls``, without importing anything.

    True when it is ``cls``'s own path, or when its module is imported already and the name there is ``cls``
    (a re-export such as ``package.Model`` for ``package.models.Model``). A module that is not imported
    yet is never imported: the name then counts as another class.
    """
    if saved == class_path_of(cls):
        return True
    module, _, name = saved.rpartition(".")
    found: Any = sys.modules.get(module)
    for part in name.split(".") if found is not None else ():
        found = getattr(found, part, None)
    return found is cls


def check_model_class(checkpoint: dict[str, Any], cls: type | None, config_path: str | None, ckpt_path: str) -> None:
    """Refuse a checkpoint whose hyperparameters name another class than the model's (``cls``).

    ``config_path`` is the class path as the user's config spells it (accepted as is). Nothing is imported.
    """
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    for key in CLASS_KEYS:
        saved = hyper_parameters.get(key)
        if saved is None or saved == config_path or (cls is not None and names_class(str(saved), cls)):
            continue
        model = config_path or (class_path_of(cls) if cls is not None else "the configured model")
        raise ValueError(
            f"{ckpt_path} names the class {saved!r} (hyper_parameters[{key!r}]), but your model is {model}. A "
            "checkpoint never chooses the class, and the one it names was not imported: pass a checkpoint of "
            f"{model}, or set your config's model to the class the checkpoint was fitted with."
        )


PLAIN_TYPES = (bool, int, float, str, type(None))
"""The annotations whose values are data: a checkpoint's value is applied only to a parameter of these types
(or ``Optional``, ``Union``, ``Literal``, ``list``, ``tuple``, ``dict`` of them)."""


def is_plain(annotation: Any) -> bool:
    """Whether a parameter annotated so takes only data: no class, callable, module or ``Any`` (which the
    argument parser may resolve from a dotted string by importing it)."""
    if annotation in PLAIN_TYPES:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(value, PLAIN_TYPES) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType, list, tuple, dict, set, frozenset):
        return all(arg is Ellipsis or is_plain(arg) for arg in typing.get_args(annotation))
    return False


def _is_data(value: Any) -> bool:
    """Plain values, and lists and dicts of them; a dict that names a class (:data:`CLASS_KEYS`) is not data."""
    if isinstance(value, PLAIN_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if isinstance(value, dict):
        keys_are_data = all(isinstance(k, str) and k not in CLASS_KEYS for k in value)
        return keys_are_data and all(_is_data(v) for v in value.values())
    return False


def model_arguments(checkpoint: dict[str, Any], cls: type | None) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's hyperparameters that may be applied to ``cls(...)`` as they are, and the keys left out.

    Applied: keys that are ``__init__`` parameters of ``cls`` annotated with plain types (:func:`is_plain`) and
    whose values are plain data (no ``class_path`` at any depth). The keys that name a class
    (:data:`CLASS_KEYS`) and Lightning's own (:data:`LIGHTNING_KEYS`) are dropped silently; every other key
    is left out (building from it could import what the file names).
    """
    values = {
        k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in CLASS_KEYS + LIGHTNING_KEYS
    }
    try:
        signature = inspect.signature(cls.__init__) if cls is not None else None
        hints = typing.get_type_hints(cls.__init__) if cls is not None else {}
    except (TypeError, ValueError, NameError):
        signature = None
    if signature is None:
        return {}, sorted(values)
    kept = {}
    for key, value in values.items():
        parameter = signature.parameters.get(key)
        if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if key in hints and is_plain(hints[key]) and _is_data(value):
            kept[key] = value
    return kept, sorted(set(values) - set(kept))
