"""Per-layer sharpness and the rules that pick which layers to unlearn in (paper section 4.1)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

SELECTION_RULES = ("flattest", "sharpest", "last", "all", "newton_decrement")


def trainable_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{module path: [parameter names]}`` for every module that directly owns trainable parameters.

    Modules come in registration order; parameter names are those of ``model.named_parameters()``.
    A parameter shared by several modules (tied weights) belongs to the first that registers it.
    """
    canonical = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    layers: dict[str, list[str]] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        names = []
        for p in module.parameters(recurse=False):
            if id(p) in canonical and id(p) not in seen:
                seen.add(id(p))
                names.append(canonical[id(p)])
        if names:
            layers[path] = names
    return layers


def layer_sharpness(model: nn.Module, diag: dict[str, Tensor]) -> dict[str, float]:
    """Mean Hessian diagonal of each layer: ``s_l = (1/|θ_l|) Σ_{i ∈ θ_l} H_ii``.

    One entry per module that directly owns trainable parameters (weight and bias together), in
    registration order. ``diag`` is the output of :func:`hessian_diagonal`.
    """
    sharpness: dict[str, float] = {}
    for path, names in trainable_layers(model).items():
        missing = [n for n in names if n not in diag]
        if missing:
            raise KeyError(f"the curvature has no entry for {missing}; compute it on the same model.")
        total = sum(float(diag[n].double().sum()) for n in names)
        sharpness[path] = total / sum(diag[n].numel() for n in names)
    return sharpness


def did_you_mean(unknown: Sequence[str], layers: Sequence[str]) -> str:
    """`` (did you mean 'model.fc'?)`` for names that end a layer's path or are close to one; ``""`` for none."""
    guesses = []
    for name in unknown:
        ends = [layer for layer in layers if layer.endswith("." + name)]
        guesses += ends[:3] or difflib.get_close_matches(name, layers, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(g) for g in dict.fromkeys(guesses))}?)" if guesses else ""


def select_layers(sharpness: dict[str, float], rule: str | Sequence[str], num_layers: int = 1) -> list[str]:
    """Apply a selection rule to per-layer sharpness (in registration order).

    * ``"flattest"``: the ``num_layers`` smallest sharpness values (paper section 4.1, Figure 1);
    * ``"sharpest"``: the largest (the paper's abstract and section 5.1);
    * ``"last"``: the last ``num_layers`` layers (Warnecke et al.'s baseline);
    * ``"all"``: every layer;
    * ``"newton_decrement"``: the largest values, for scores from :func:`newton_decrement`;
    * a list of module paths: exactly those.
    """
    layers = list(sharpness)
    if not layers:
        raise ValueError("there are no trainable layers to select from.")
    if not isinstance(rule, str):
        chosen = list(rule)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"selection {chosen} names a module more than once; name each module once.")
        unknown = [name for name in chosen if name not in sharpness]
        if unknown or not chosen:
            shown = layers if len(layers) <= 12 else [*layers[:12], f"... {len(layers) - 12} more"]
            raise ValueError(
                f"selection names {unknown or 'no layers'}, which {'is' if len(unknown) == 1 else 'are'} not "
                f"{'a module' if len(unknown) == 1 else 'modules'} that own{'s' * (len(unknown) == 1)} trainable "
                f"parameters{did_you_mean(unknown, layers)}. The model's {len(layers)} such modules: {shown}."
            )
        return chosen
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {SELECTION_RULES} or a list of module paths.")
    if rule == "all":
        return layers
    if not 1 <= num_layers <= len(layers):
        raise ValueError(
            f"num_layers={num_layers} but the model has {len(layers)} trainable layers; "
            f"choose 1 <= num_layers <= {len(layers)}."
        )
    if rule == "last":
        return layers[-num_layers:]
    ranked = sorted(layers, key=sharpness.__getitem__, reverse=rule in ("sharpest", "newton_decrement"))
    return ranked[:num_layers]


def newton_decrement(
    model: nn.Module, gradient: dict[str, Tensor], diag: dict[str, Tensor], damping: float = 0.0
) -> dict[str, float]:
    """Predicted decrease of the forget loss per layer under a diagonal second-order step, per parameter.

    ``d_l = (1/|θ_l|) Σ_{i ∈ θ_l} g_i² / (H_ii + λ)``, with ``g = ∇L_forget`` (eq. 7) and ``H_ii``
    the diagonal of the SUM learning loss (eq. 2). Unlike the paper's rules it uses both the
    curvature and the forget gradient; pick the layers with the LARGEST decrement. A
    non-positive ``H_ii + λ`` (possible with stochastic estimates) is treated as ``1e-12``.
    """
    scores = entry_decrement(gradient, diag, damping)
    return {
        path: sum(float(scores[n].sum()) for n in names) / sum(scores[n].numel() for n in names)
        for path, names in trainable_layers(model).items()
    }


def entry_decrement(gradient: dict[str, Tensor], diag: dict[str, Tensor], damping: float = 0.0) -> dict[str, Tensor]:
    """``g_i² / (H_ii + λ)`` for every entry: the per-parameter Newton decrement."""
    return {name: gradient[name].double() ** 2 / (diag[name].double() + damping).clamp(min=1e-12) for name in diag}


def top_fraction(scores: dict[str, Tensor], fraction: float, largest: bool) -> dict[str, Tensor]:
    """Boolean masks of the ``fraction`` of all entries with the largest (or smallest) score, model-wide.

    Exactly ``ceil(fraction · P)`` entries are selected (ties broken by position). Parameters with
    no selected entry are left out of the result.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    count = math.ceil(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, count, largest=largest).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        mask = chosen[start : start + s.numel()].view(s.shape)
        start += s.numel()
        if mask.any():
            masks[name] = mask
    return masks


def selection_margin(
    sharpness: dict[str, float], statistics: Any, selected: list[str], rule: Any
) -> dict[str, Any] | None:
    """How far the last selected layer leads the best unselected one, in standard errors.

    ``statistics`` gives ``difference_standard_error(a, b)``, the standard error of ``sharpness[a] −
    sharpness[b]`` (:class:`~lightning_sa_unlearn.curvature.SharpnessStatistics`).

    For ``"flattest"`` and ``"sharpest"`` only (other rules do not rank the sharpness); None otherwise,
    when every layer is selected, or when ``selected`` is not what the rule picks (an overridden
    ``select_layers``).
    """
    if rule not in ("flattest", "sharpest") or len(selected) >= len(sharpness):
        return None
    if sorted(selected) != sorted(select_layers(sharpness, rule, len(selected))):
        return None
    sign = 1.0 if rule == "flattest" else -1.0
    last = max(selected, key=lambda layer: sign * sharpness[layer])
    runner_up = min((layer for layer in sharpness if layer not in selected), key=lambda layer: sign * sharpness[layer])
    lead = sign * (sharpness[runner_up] - sharpness[last])
    error = statistics.difference_standard_error(runner_up, last)
    return {
        "selected": last,
        "runner_up": runner_up,
        "lead": lead,
        "standard_error": error,
        "lead_in_standard_errors": _in_standard_errors(lead, error),
    }


def _in_standard_errors(lead: float, error: float) -> float:
    """``lead / error``; NaN without an error estimate (one batch); 0 for an exact tie; inf for a sure lead."""
    if math.isnan(error):
        return math.nan
    if error == 0:
        return math.inf if lead > 0 else 0.0
    return lead / error
