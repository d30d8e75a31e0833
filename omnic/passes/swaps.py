"""Operator swaps: replace operators a device runs slowly with cheaper near-equivalents.

Activations (GELU, SiLU, Mish, sigmoid, hard-swish) and bilinear resizes listed in the device's
``slow_ops``, and LayerNorm over channels where ``has_fast_layernorm`` is False. Every swap here
is approximate: ``adapt`` tries them only with ``approximate=True`` and bounds the output change.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from omnic.core.targets import DeviceSpec
from omnic.passes.base import (PassReport, call_sites, copy_graph_module, example_inputs_of, finish, module_of,
                               replace_node, unchanged)


# ------------------------------------------------------------------------- activation swaps
def _hard_gelu(g: fx.Graph, x: fx.Node) -> fx.Node:
    # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel); the sigmoid's piecewise-linear
    # version is hardsigmoid(y) = clip(y / 6 + 1/2) with the same slope at 0: y = 6 * 1.702 / 4 x.
    scaled = g.call_function(operator.mul, (x, 6 * 1.702 / 4))
    return g.call_function(operator.mul, (x, g.call_function(F.hardsigmoid, (scaled,))))


#: replacement -> (device op its cost is made of, graph builder)
_REPLACEMENTS: Mapping[str, tuple[str, Callable[[fx.Graph, fx.Node], fx.Node]]] = {
    "hard_gelu": ("hardswish", _hard_gelu),
    "hardswish": ("hardswish", lambda g, x: g.call_function(F.hardswish, (x,))),
    "hardsigmoid": ("hardswish", lambda g, x: g.call_function(F.hardsigmoid, (x,))),
    "relu": ("relu", lambda g, x: g.call_function(F.relu, (x,))),
}
#: activation (as named in DeviceSpec.slow_ops) -> device-friendly replacements, best fit first
ACTIVATION_SWAPS: Mapping[str, tuple[str, ...]] = {
    "gelu": ("hard_gelu", "relu"),
    "silu": ("hardswish", "relu"),
    "mish": ("hardswish", "relu"),
    "sigmoid": ("hardsigmoid",),   # SE / attention gates
    "hardswish": ("relu",),
}
_ACT_MODULES = {nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish"}
_ACT_FNS = {F.gelu: "gelu", F.silu: "silu", F.mish: "mish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
            F.hardswish: "hardswish"}


def _activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(module_of(gm, node)))
    if node.op == "call_function":
        return _ACT_FNS.get(node.target)
    if node.op == "call_method" and node.target == "sigmoid":
        return "sigmoid"
    return None


def swap_activations(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Replace activations listed in ``spec.slow_ops`` with piecewise-linear ones (approximate).

    GELU -> x * hardsigmoid(1.702 * 6/4 * x), SiLU and Mish -> hard-swish, sigmoid gates ->
    hard-sigmoid, hard-swish -> ReLU; a replacement whose own cost op is slow on the device is
    skipped for the next one in :data:`ACTIVATION_SWAPS`.
    """
    plan: dict[str, str] = {}
    for act, options in ACTIVATION_SWAPS.items():
        if act in spec.slow_ops:
            usable = [r for r in options if _REPLACEMENTS[r][0] not in spec.slow_ops]
            if usable:
                plan[act] = usable[0]
    if not plan:
        return unchanged(gm, "swap_activations", exact=False,
                         why=f"no activation in {spec.name}'s slow_ops has a friendlier replacement")
    gm = copy_graph_module(gm)
    changed: list[str] = []
    swapped: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        act = _activation(gm, node)
        if act not in plan or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        with gm.graph.inserting_before(node):
            new = _REPLACEMENTS[plan[act]][1](gm.graph, node.args[0])
        replace_node(gm, node, new, changed)
        swapped[f"{act}->{plan[act]}"] = swapped.get(f"{act}->{plan[act]}", 0) + 1
    why = "; ".join(f"{a} is slow on {spec.name} ({spec.slow_ops[a]}): {r} instead" for a, r in plan.items())
    return finish(gm, "swap_activations", changed, exact=False, why=why,
                  notes=(f"{k}: {v}" for k, v in swapped.items()))


# ------------------------------------------------------------------------- bilinear -> nearest
def bilinear_to_nearest(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Bilinear upsampling (``F.interpolate``, ``nn.Upsample``, ``nn.UpsamplingBilinear2d``) ->
    nearest, where ``resize_bilinear`` is in ``spec.slow_ops`` (approximate)."""
    if "resize_bilinear" not in spec.slow_ops:
        return unchanged(gm, "bilinear_to_nearest", exact=False,
                         why=f"bilinear resize is not listed as slow on {spec.name}")
    gm = copy_graph_module(gm)
    changed: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.interpolate:
            names = ("input", "size", "scale_factor", "mode", "align_corners")
            kw = dict(zip(names, node.args))
            kw.update(node.kwargs)
            if kw.get("mode") != "bilinear":
                continue
            x, size, scale = kw["input"], kw.get("size"), kw.get("scale_factor")
        elif node.op == "call_module" and isinstance(module_of(gm, node), nn.Upsample):
            mod = module_of(gm, node)
            if mod.mode != "bilinear":
                continue
            x, size, scale = node.args[0], mod.size, mod.scale_factor
        else:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(F.interpolate, (x,), {"size": size, "scale_factor": scale,
                                                                "mode": "nearest"})
        replace_node(gm, node, new, changed)
    return finish(gm, "bilinear_to_nearest", changed, exact=False,
                  why=f"bilinear resize is slow on {spec.name} ({spec.slow_ops['resize_bilinear']})")


# ----------------------------------------------------------------------- LayerNorm -> BatchNorm
def _permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return tuple(int(d) % 4 for d in dims)


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the values of the requested nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach()
        return out


def layernorm_to_batchnorm(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """``permute(0,2,3,1) -> LayerNorm(C) -> permute(0,3,1,2)`` -> ``BatchNorm2d(C)`` where the
    device has no fast LayerNorm (approximate).

    How the statistics are set: a BatchNorm is a fixed per-channel affine map, LayerNorm a
    per-position one. On the calibration activations (the example inputs ``adapt`` was given,
    else random ones) the pass fits, per channel, the affine map ``a_c * x + b_c`` that best
    matches (least squares) the normalised value ``(x - mean_pos) / std_pos``, and stores it as
    ``running_mean = mean_c(x) - mean_c(z) / a_c``, ``running_var = 1 / a_c**2 - eps``; the
    LayerNorm's own weight and bias become the BatchNorm's. The output moves (reported by
    ``adapt``); fine-tune afterwards for accuracy.
    """
    if spec.has_fast_layernorm:
        return unchanged(gm, "layernorm_to_batchnorm", exact=False,
                         why=f"{spec.name} has a fast LayerNorm")
    gm = copy_graph_module(gm)
    matches = []
    for node in gm.graph.nodes:
        ln = module_of(gm, node)
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            continue
        pre = node.args[0]
        if not isinstance(pre, fx.Node) or _permute_dims(pre) != (0, 2, 3, 1) or len(node.users) != 1:
            continue
        post = next(iter(node.users))
        if _permute_dims(post) != (0, 3, 1, 2) or call_sites(gm, str(node.target)) != 1:
            continue
        matches.append((pre, node, post))
    if not matches:
        return gm, PassReport(name="layernorm_to_batchnorm", exact=False,
                              why=f"{spec.name} lacks a fast LayerNorm, but no LayerNorm over channels found")
    runner = _Capture(gm, {pre.name for pre, _, _ in matches})
    with torch.no_grad():
        runner.run(*example_inputs_of(gm))
    changed: list[str] = []
    notes: list[str] = []
    for pre, node, post in matches:
        ln = module_of(gm, node)
        x = runner.values[pre.name].reshape(-1, ln.normalized_shape[0]).double()  # (positions, C)
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + ln.eps)
        xc = x - x.mean(0)
        a = (xc * (z - z.mean(0))).mean(0) / xc.pow(2).mean(0).clamp_min(1e-12)
        # a non-positive slope cannot be a variance; fall back to the average LayerNorm scale
        fallback = 1.0 / torch.sqrt(x.var(1, unbiased=False) + ln.eps).mean()
        a = torch.where(a > 1e-6, a, fallback)
        bn = nn.BatchNorm2d(ln.normalized_shape[0], eps=ln.eps, affine=True).eval()
        with torch.no_grad():
            bn.running_mean.copy_((x.mean(0) - z.mean(0) / a).float())
            bn.running_var.copy_((1.0 / a.pow(2) - ln.eps).clamp_min(0.0).float())
            if ln.weight is not None:
                bn.weight.copy_(ln.weight)
            if ln.bias is not None:
                bn.bias.copy_(ln.bias)
        gm.set_submodule(str(node.target), bn)
        # BN runs on the NCHW tensor the first permute read, so both permutes go
        node.args = (pre.args[0],)
        post.replace_all_uses_with(node)
        gm.graph.erase_node(post)
        changed.extend([pre.name, node.name, post.name])
        notes.append(f"{node.name}: calibrated on {x.shape[0]} positions")
    return finish(gm, "layernorm_to_batchnorm", changed, exact=False,
                  why=f"{spec.name} has no fast LayerNorm over channels (has_fast_layernorm=False)", notes=notes)
