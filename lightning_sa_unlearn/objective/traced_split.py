"""Splitting a traceable model at the selection: what does not depend on the selected parameters runs once.

For a model that ``torch.fx`` can trace, every node of its graph either depends on a selected parameter
(a call of a module that owns one, a read of one, or anything computed from those) or not. The *frontier*
is the set of nodes that depend on the input but not on the selection, and feed a node that does:
``below(x)`` computes them, ``above(frontier)`` the rest, and ``model(x) == above(below(x))``. A residual
network whose selected layer sits in its last block stores the block's input (and any skip tensor that
crosses it); an evaluation then runs that block and the head only. Nodes that depend on neither (constants,
reads of frozen parameters) are recomputed by ``above``.

Used where :func:`~lightning_sa_unlearn.objective.stored_features.split_below` finds no ``nn.Sequential``
chain. A model that cannot be traced (data-dependent control flow), whose selection starts at the input, or
whose split does not reproduce the model's output on the probe bit for bit, is not split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves


class FrontierInput(nn.Module):
    """``above`` as a module of one argument: the frontier (one tensor, or a tuple of them)."""

    def __init__(self, graph_module: fx.GraphModule, count: int) -> None:
        super().__init__()
        self.graph_module, self.count = graph_module, count

    def forward(self, frontier: Any) -> Any:
        return self.graph_module(*frontier) if self.count > 1 else self.graph_module(frontier)


def traced_split(model: nn.Module, names: Sequence[str], probe: Any) -> tuple[nn.Module, nn.Module, str] | None:
    """``(below, above, description)`` with ``model(x) == above(below(x))``, or None (see the module's rules)."""
    if not isinstance(probe, torch.Tensor) or not names:
        return None
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow, unsupported calls: no split
        return None
    selected = tuple(names)
    on_selection: dict[fx.Node, bool] = {}
    on_input: dict[fx.Node, bool] = {}
    for node in traced.graph.nodes:
        inputs = node.all_input_nodes
        owns = node.op in ("call_module", "get_attr") and any(
            n == node.target or n.startswith(f"{node.target}.") for n in selected
        )
        on_selection[node] = owns or any(on_selection[a] for a in inputs)
        on_input[node] = node.op == "placeholder" or any(on_input[a] for a in inputs)
    output = next(node for node in traced.graph.nodes if node.op == "output")
    if sum(node.op == "placeholder" for node in traced.graph.nodes) != 1 or not on_selection[output]:
        return None
    frontier = list(
        dict.fromkeys(
            a
            for node in traced.graph.nodes
            if on_selection[node]
            for a in node.all_input_nodes
            if not on_selection[a] and on_input[a]
        )
    )
    if not frontier or any(node.op == "placeholder" for node in frontier):
        return None  # the selection reads the input itself: nothing to store
    try:
        below, above = _below(traced, frontier, on_selection), _above(traced, frontier, on_selection, on_input)
    except Exception:  # a graph fx traced but cannot rebuild: no split
        return None
    split = below, FrontierInput(above, len(frontier))
    if not _reproduces(model, *split, probe):
        return None
    described = "+".join(str(node.target) if node.op == "call_module" else node.name for node in frontier)
    return split[0], split[1], described


def _below(traced: fx.GraphModule, frontier: list[fx.Node], on_selection: dict[fx.Node, bool]) -> fx.GraphModule:
    graph, copies = fx.Graph(), {}
    for node in traced.graph.nodes:
        if node.op != "output" and not on_selection[node]:
            copies[node] = graph.node_copy(node, lambda a: copies[a])
    outputs = [copies[node] for node in frontier]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return _pruned(fx.GraphModule(traced, graph))


def _above(
    traced: fx.GraphModule, frontier: list[fx.Node], on_selection: dict[fx.Node, bool], on_input: dict[fx.Node, bool]
) -> fx.GraphModule:
    graph, copies = fx.Graph(), {}
    for node in frontier:
        copies[node] = graph.placeholder(f"frontier_{node.name}")
    for node in traced.graph.nodes:
        if node in copies or node.op == "placeholder":
            continue
        if node.op == "output" or on_selection[node] or not on_input[node]:
            copies[node] = graph.node_copy(node, lambda a: copies[a])
    return _pruned(fx.GraphModule(traced, graph))


def _pruned(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` without the nodes its output does not need, nor the submodules they called."""
    module.graph.eliminate_dead_code()
    module.recompile()
    module.delete_all_unused_submodules()
    return module


def _reproduces(model: nn.Module, below: nn.Module, above: nn.Module, probe: torch.Tensor) -> bool:
    """Whether ``above(below(probe))`` equals ``model(probe)`` bit for bit, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole, split = tree_leaves(model(probe)), tree_leaves(above(below(probe)))
        return len(whole) == len(split) and all(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
            for a, b in zip(whole, split)
        )
    except Exception:  # the split graph cannot run (an op fx traced but cannot replay): no split
        return False
    finally:
        model.train(was_training)


__all__ = ["FrontierInput", "traced_split"]
