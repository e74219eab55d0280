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
    kind = f"{'an' if base.__name__[0] in 'AEIOU' else 'a'} {base.__name__}"
    if isinstance(value, type) and issubclass(value, base):
        raise ValueError(f"{argument}={value.__name__} is a class: pass an instance, {value.__name__}().")
    raise ValueError(
        f"{argument}={value!r} is not {kind}: pass one of {names}, or {kind} object (in YAML: class_path and "
        "init_args)."
    )


def resolve_list(
    values: Any, base: type[Part], builtins: Mapping[str, Callable[[], Part]], argument: str
) -> list[Part]:
    """Each of a list of parts (:func:`resolve`), at most one of each kind."""
    if isinstance(values, (str, base)):
        raise ValueError(f"{argument} takes a list, e.g. {list(builtins)}, got {values!r}.")
    parts = [resolve(value, base, builtins, argument) for value in values or []]
    if len({type(part) for part in parts}) != len(parts):
        raise ValueError(f"{argument} lists a kind more than once: {parts}.")
    return parts


def check_loss_fn(loss_fn: Any) -> Any:
    """``loss_fn`` if it is a callable ``loss(logits, targets)``; a class (``nn.CrossEntropyLoss``) is refused."""
    if isinstance(loss_fn, type) or not callable(loss_fn):
        raise ValueError(
            f"loss_fn={getattr(loss_fn, '__name__', loss_fn)!r} must be a callable loss(logits, targets): pass an "
            "instance such as nn.CrossEntropyLoss(), not the class, or a function such as F.cross_entropy."
        )
    return loss_fn
