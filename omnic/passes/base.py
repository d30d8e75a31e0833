"""The pass framework: pure ``(GraphModule, DeviceSpec) -> (GraphModule, PassReport)`` functions.

This module holds what every pass shares (the report, the registry entry, graph helpers and the
epilogue :func:`finish`); it imports no pass. The passes live one concept per module
(``legalize``, ``channels``, ``swaps``, ``exact``), :mod:`omnic.passes.registry` lists them and
:mod:`omnic.passes.runner` applies them by name.

Every pass copies its input first (like ``torch.fx.experimental.optimization.fuse(inplace=False)``)
so a caller can try a rewrite, measure it, and throw it away without having touched the graph it
started from. Passes record which nodes they changed and why they apply to the device, so the
adaptation report can explain every decision.

Passes walk the graph by hand instead of using ``torch.fx.subgraph_rewriter``: their patterns
depend on module attributes and recorded shapes (a BatchNorm after a conv used once, a depthwise
conv with kernel > N, a permute/LayerNorm/permute over the channel axis, channel groups through
residual adds), which the rewriter's call_module matching (by target name) cannot express.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from omnic.core.errors import PassError
from omnic.core.targets import DeviceSpec

#: ``gm.meta`` key under which :func:`omnic.passes.adapt.adapt` leaves the example inputs, so
#: passes that calibrate (LayerNorm -> BatchNorm) use real activations instead of random ones.
EXAMPLE_INPUTS_META = "omnic_example_inputs"


@dataclass(frozen=True, kw_only=True)
class PassReport:
    """What one pass did to one graph.

    Attributes:
        name: The pass's name.
        nodes_changed: Names of the nodes (in the input graph) that were rewritten or removed.
        exact: True when the rewrite keeps outputs equal (up to float rounding).
        why: Why the pass applies (or does not apply) to this device.
        notes: Extra detail: patterns skipped and the reason, calibration statistics used.
    """

    name: str
    nodes_changed: tuple[str, ...] = ()
    exact: bool = True
    why: str = ""
    notes: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """True when the pass rewrote anything."""
        return bool(self.nodes_changed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "nodes_changed": list(self.nodes_changed), "exact": self.exact,
                "why": self.why, "notes": list(self.notes)}


PassFn = Callable[[fx.GraphModule, DeviceSpec], "tuple[fx.GraphModule, PassReport]"]


@dataclass(frozen=True, kw_only=True)
class PassInfo:
    """A registered pass (the table is :data:`omnic.passes.registry.PASSES`).

    Attributes:
        name: Name used in reports, ``passes=`` arguments and the CLI.
        fn: The pass function.
        exact: Whether its rewrites keep outputs equal.
        required: Legalisation passes (rewrite what the device cannot run at all): ``adapt``
            applies them unconditionally, before it measures anything.
    """

    name: str
    fn: PassFn
    exact: bool
    required: bool = False


# ------------------------------------------------------------------------------------ helpers
def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy (modules, parameters, graph and node meta) that a pass may edit freely."""
    new = copy.deepcopy(gm)
    new.meta = dict(getattr(gm, "meta", {}) or {})
    return new


def example_inputs_of(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """The example inputs stored on the graph, or random ones shaped like its placeholders."""
    stored = (getattr(gm, "meta", None) or {}).get(EXAMPLE_INPUTS_META)
    if stored is not None:
        return tuple(stored)
    inputs = []
    gen = torch.Generator().manual_seed(0)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None:
            raise PassError(f"placeholder {node.name!r} has no shape: trace the model with omnic.core.ir.trace first")
        inputs.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
    return tuple(inputs)


def refresh_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Recompile and re-record ``tensor_meta`` after a rewrite, so later passes see shapes."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs_of(gm))
    return gm


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The recorded output shape of an fx node, or None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def op_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The device-table name of what ``node`` computes (``nn.AdaptiveMaxPool2d`` ->
    ``adaptive_max_pool2d``, ``F.gelu`` -> ``gelu``), or None for placeholders/outputs."""
    if node.op == "call_module":
        cls = type(module_of(gm, node)).__name__
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls).lower()
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).lstrip("_")
    if node.op == "call_method":
        return str(node.target)
    return None


def pair(value: Any) -> tuple[Any, Any]:
    """``value`` as ``(h, w)``: a pooling or kernel size given as one number or a pair."""
    return (value, value) if not isinstance(value, (tuple, list)) else (value[0], value[1])


def call_sites(gm: fx.GraphModule, target: str) -> int:
    """How many ``call_module`` nodes call the submodule ``target`` (shared modules are left alone)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def add_module(gm: fx.GraphModule, hint: str, module: nn.Module) -> str:
    """Add ``module`` under a fresh top-level name derived from ``hint``; returns the name."""
    base = "omnic_" + hint.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, module)
    return name


def replace_node(gm: fx.GraphModule, node: fx.Node, new: fx.Node, changed: list[str]) -> None:
    """Route every use of ``node`` to ``new``, erase ``node`` and record its name in ``changed``."""
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    changed.append(node.name)


def finish(gm: fx.GraphModule, name: str, changed: Sequence[str], *, exact: bool, why: str,
           notes: Iterable[str] = ()) -> tuple[fx.GraphModule, PassReport]:
    """The epilogue of a pass that rewrote ``gm`` (its own copy): refresh the recorded shapes
    so the next pass sees them, and report the nodes in ``changed``."""
    refresh_shapes(gm)
    return gm, PassReport(name=name, nodes_changed=tuple(changed), exact=exact, why=why, notes=tuple(notes))


def unchanged(gm: fx.GraphModule, name: str, *, exact: bool, why: str,
              notes: Iterable[str] = ()) -> tuple[fx.GraphModule, PassReport]:
    """The result of a pass that does not apply: a copy of the input and an empty report."""
    return copy_graph_module(gm), PassReport(name=name, exact=exact, why=why, notes=tuple(notes))
