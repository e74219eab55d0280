"""Strings for built-in parts, objects for everything else (as Lightning's ``ModelPruning(pruning_fn=...)``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

Part = TypeVar("Part")


def resolve(value: Any, base: type[Part], builtins: Mapping[str, Callable[[], Part]], argument: str) -> Part:
    """``value`` if it is a ``base``, the built-in it names if it is a string; else a ValueError saying what to pass."""
    if isinstance(value, base):
        return value
    if isinstance(value, str) and value in builtins:
        return builtins[value]()
    names = ", ".join(repr(name) for name in builtins)
    raise ValueError(
        f"{argument}={value!r} is not a {base.__name__}: pass one of {names}, or a {base.__name__} object "
        f"(in YAML: class_path and init_args)."
    )
