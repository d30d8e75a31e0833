"""Device-driven passes: legalise what the device cannot run, pad channels, swap slow operators.

Which rewrites a device wants comes from fields of its :class:`~omnic.core.targets.DeviceSpec`
(``slow_ops``, ``fast_ops``, ``channel_multiple``, ``has_fast_layernorm``,
``max_depthwise_kernel``, ``unsupported_ops``), never from its name. A pass that does not apply
to a device returns a copy of its input and says why in the report.
"""
from __future__ import annotations

import copy
import math
import operator
import re
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from omnic.core.errors import UnsupportedOperatorError
from omnic.passes.base import (PassReport, call_sites, copy_graph_module, example_inputs_of, module_of,
                               refresh_shapes, register_pass, set_module, shape_of, unchanged)
from omnic.core.targets import DeviceSpec

#: Operators TVM's importers cannot take on any device (TVM_NOTES 1.2), with why.
TVM_UNSUPPORTED: Mapping[str, str] = {
    "adaptive_max_pool2d": "TVM's fx and ExportedProgram importers have no converter for it",
}


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


def _pair(v: Any) -> tuple[Any, Any]:
    return (v, v) if not isinstance(v, (tuple, list)) else (v[0], v[1])


# ----------------------------------------------------------------------------- legalisation
@register_pass("legalize_unsupported", exact=True, required=True)
def legalize_unsupported(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Rewrite operators the device cannot run at all; name the ones no rewrite covers.

    ``AdaptiveMaxPool2d`` (no TVM converter) becomes ``amax`` over H, W for a 1x1 output, or
    ``MaxPool2d`` with a fixed kernel when the input size is a multiple of the output size (both
    exact). Anything else listed in :data:`TVM_UNSUPPORTED` or the device's ``unsupported_ops``
    raises :class:`~omnic.core.errors.UnsupportedOperatorError` naming the node, its shape and a fix.

    Raises:
        UnsupportedOperatorError: An unsupported operator with no exact rewrite here.
    """
    gm = copy_graph_module(gm)
    unsupported = {**TVM_UNSUPPORTED, **dict(spec.unsupported_ops)}
    changed: list[str] = []
    for node in list(gm.graph.nodes):
        name = op_name(gm, node)
        if name not in unsupported:
            continue
        x = node.args[0] if node.args else None
        shape = shape_of(x)
        if name == "adaptive_max_pool2d" and shape is not None and len(shape) >= 3:
            if node.op == "call_module":
                mod = module_of(gm, node)
                out_size, with_indices = mod.output_size, mod.return_indices
            else:
                out_size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
                with_indices = node.kwargs.get("return_indices", node.args[2] if len(node.args) > 2 else False)
            h, w = shape[-2:]
            oh, ow = _pair(out_size)
            oh, ow = oh or h, ow or w
            if not with_indices and (h % oh == 0 and w % ow == 0):
                with gm.graph.inserting_after(node):
                    if (oh, ow) == (1, 1):
                        new = gm.graph.call_function(torch.amax, (x,), {"dim": (-2, -1), "keepdim": True})
                    else:
                        kernel = (h // oh, w // ow)
                        new = gm.graph.call_function(F.max_pool2d, (x, kernel, kernel))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed.append(node.name)
                continue
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({name}, input {h}x{w} -> output {oh}x{ow}) cannot run on "
                f"{spec.name}: {unsupported[name]}; it has no exact fixed-kernel rewrite because "
                f"{h}x{w} is not a multiple of {oh}x{ow}" + (" (or it returns indices)" if with_indices else "") +
                ".\n  fix: choose an input size that is a multiple of the output size, or use "
                "MaxPool2d / torch.amax in the model")
        raise UnsupportedOperatorError(
            f"node {node.name!r} ({name}) cannot run on {spec.name}: {unsupported[name]}; omnic has "
            "no rewrite for it.\n  fix: replace it in the model with a supported equivalent")
    refresh_shapes(gm)
    return gm, PassReport(name="legalize_unsupported", nodes_changed=tuple(changed), exact=True,
                          why=f"operators {spec.name} cannot run at all: {', '.join(sorted(unsupported))}")


# ---------------------------------------------------------------------------- channel padding
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU,
                        nn.Mish, nn.Tanh, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout,
                        nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FNS = {F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.gelu, F.silu, F.mish, F.sigmoid,
                    torch.sigmoid, torch.relu, torch.tanh, F.hardtanh, F.leaky_relu, F.avg_pool2d,
                    F.max_pool2d, F.adaptive_avg_pool2d, F.dropout, operator.add, operator.mul,
                    operator.sub, torch.add, torch.mul, torch.sub}
_PER_CHANNEL_METHODS = {"relu", "sigmoid", "tanh", "add", "mul", "sub", "contiguous"}
# Division is left out on purpose: a padded zero channel as divisor would make inf/NaN, and
# 0 * NaN in the consumer's zero weights is NaN, so the result would not stay exact.


def _is_dense_conv(mod: Any) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"


def _is_depthwise(mod: Any) -> bool:
    return (isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels
            and mod.padding_mode == "zeros")


def _per_channel(gm: fx.GraphModule, node: fx.Node, channels: int) -> bool:
    """True when ``node`` maps each channel of a (N, C, H, W) tensor on its own."""
    shape = shape_of(node)
    if shape is None or len(shape) != 4 or shape[1] != channels:
        return False
    if node.op == "call_module":
        mod = module_of(gm, node)
        return isinstance(mod, _PER_CHANNEL_MODULES) or _is_depthwise(mod) or isinstance(mod, nn.BatchNorm2d)
    if node.op == "call_function":
        if node.target is torch.mean:
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            return bool(node.kwargs.get("keepdim")) and all(d is not None and d % 4 in (2, 3) for d in dims)
        return node.target in _PER_CHANNEL_FNS
    if node.op == "call_method":
        if node.target == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            return bool(node.kwargs.get("keepdim")) and all(d is not None and d % 4 in (2, 3) for d in dims)
        return node.target in _PER_CHANNEL_METHODS
    return False


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def _channel_region(gm: fx.GraphModule, start: fx.Node) -> tuple[dict[str, set], str | None]:
    """The nodes that share ``start``'s output channels, up to the convs that consume them.

    Returns:
        ``({"region", "producers", "consumers"}, None)``, or ``({}, reason)`` when something
        mixes channels in a way zero channels cannot pass through (flatten, linear, cat, output).
    """
    channels = module_of(gm, start).out_channels
    region, producers, consumers = {start}, {start}, set()
    stack = [start]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in region:
                continue
            mod = module_of(gm, u)
            if _is_dense_conv(mod) and u.args[0] is n and not u.kwargs:
                consumers.add(u)
                continue
            if _per_channel(gm, u, channels):
                region.add(u)
                stack.append(u)
                continue
            return {}, f"{u.name} ({op_name(gm, u)}) mixes or reshapes channels"
        if n in producers:
            continue
        for a in _tensor_inputs(n):
            if a in region:
                continue
            sa = shape_of(a)
            if sa is not None and (len(sa) < 2 or sa[1] == 1) and len(sa) <= 4:
                continue  # broadcast along channels: unaffected by padding
            mod = module_of(gm, a)
            if _is_dense_conv(mod) and sa is not None and sa[1] == channels:
                producers.add(a)
            elif not _per_channel(gm, a, channels):
                return {}, f"{a.name} ({op_name(gm, a)}) feeds the channel group but is not per-channel"
            region.add(a)
            stack.append(a)
    return {"region": region, "producers": producers, "consumers": consumers}, None


def _pad_param(t: torch.Tensor, dim: int, new: int, fill: float) -> torch.Tensor:
    shape = list(t.shape)
    extra = new - shape[dim]
    shape[dim] = extra
    return torch.cat([t.detach(), torch.full(shape, fill, dtype=t.dtype)], dim=dim)


def _padded_module(mod: nn.Module, *, out_to: int | None, in_to: int | None) -> nn.Module:
    """A copy of ``mod`` with zero output channels and/or zero input-channel weights added."""
    new = copy.deepcopy(mod)
    with torch.no_grad():
        if isinstance(new, nn.BatchNorm2d) and out_to:
            new.weight = nn.Parameter(_pad_param(new.weight, 0, out_to, 1.0))
            new.bias = nn.Parameter(_pad_param(new.bias, 0, out_to, 0.0))
            new.running_mean = _pad_param(new.running_mean, 0, out_to, 0.0)
            new.running_var = _pad_param(new.running_var, 0, out_to, 1.0)
            new.num_features = out_to
            return new
        if _is_depthwise(new) and out_to:
            new.weight = nn.Parameter(_pad_param(new.weight, 0, out_to, 0.0))
            if new.bias is not None:
                new.bias = nn.Parameter(_pad_param(new.bias, 0, out_to, 0.0))
            new.in_channels = new.out_channels = new.groups = out_to
            return new
        if out_to:
            new.weight = nn.Parameter(_pad_param(new.weight, 0, out_to, 0.0))
            if new.bias is not None:
                new.bias = nn.Parameter(_pad_param(new.bias, 0, out_to, 0.0))
            new.out_channels = out_to
        if in_to:
            new.weight = nn.Parameter(_pad_param(new.weight, 1, in_to, 0.0))
            new.in_channels = in_to
    return new


@register_pass("pad_channels", exact=True)
def pad_channels(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Pad channel counts to the device's ``channel_multiple`` with zero channels (exact).

    A group of tensors sharing channels (a conv's output through BN, activations, depthwise
    convs, SE gates and residual adds) is widened together: producer convs get zero filters and
    zero bias, BatchNorm gets identity statistics, depthwise convs zero filters, and the convs
    that consume the group zero weights for the new input channels. Whatever the padded channels
    hold, the consumers multiply them by zero, so outputs are unchanged. A group that reaches a
    flatten, linear, concat or the output is left alone (the report says where it stopped).
    """
    multiple = spec.channel_multiple
    if multiple <= 1:
        return unchanged(gm, "pad_channels", exact=True, why=f"{spec.name} has no preferred channel multiple")
    gm = copy_graph_module(gm)
    changed: list[str] = []
    notes: list[str] = []
    tried: set[str] = set()
    for node in list(gm.graph.nodes):
        mod = module_of(gm, node)
        if not _is_dense_conv(mod) or mod.out_channels % multiple == 0 or node.name in tried:
            continue
        group, reason = _channel_region(gm, node)
        if reason:
            notes.append(f"{node.name}: {mod.out_channels} channels not padded: {reason}")
            tried.add(node.name)
            continue
        nodes = group["region"] | group["consumers"]
        targets = [str(n.target) for n in nodes if n.op == "call_module"]
        if any(call_sites(gm, t) != 1 for t in targets):
            notes.append(f"{node.name}: a module in its channel group is called more than once")
            tried.update(n.name for n in group["producers"])
            continue
        channels = mod.out_channels
        padded = math.ceil(channels / multiple) * multiple
        for n in group["region"]:
            m = module_of(gm, n)
            if n in group["producers"] or isinstance(m, nn.BatchNorm2d) or _is_depthwise(m):
                in_to = padded if n in group["consumers"] else None
                set_module(gm, str(n.target), _padded_module(m, out_to=padded, in_to=in_to))
                changed.append(n.name)
        for n in group["consumers"] - group["producers"]:
            set_module(gm, str(n.target), _padded_module(module_of(gm, n), out_to=None, in_to=padded))
            changed.append(n.name)
        tried.update(n.name for n in group["producers"])
        notes.append(f"{node.name}: {channels} -> {padded} channels ({len(group['producers'])} producers, "
                     f"{len(group['consumers'])} consumers)")
    refresh_shapes(gm)
    return gm, PassReport(name="pad_channels", nodes_changed=tuple(dict.fromkeys(changed)), exact=True,
                          why=f"{spec.name} prefers channel counts in multiples of {multiple}",
                          notes=tuple(notes))


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


@register_pass("swap_activations", exact=False)
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
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed.append(node.name)
        swapped[f"{act}->{plan[act]}"] = swapped.get(f"{act}->{plan[act]}", 0) + 1
    refresh_shapes(gm)
    why = "; ".join(f"{a} is slow on {spec.name} ({spec.slow_ops[a]}): {r} instead" for a, r in plan.items())
    return gm, PassReport(name="swap_activations", nodes_changed=tuple(changed), exact=False, why=why,
                          notes=tuple(f"{k}: {v}" for k, v in swapped.items()))


# ------------------------------------------------------------------------- bilinear -> nearest
@register_pass("bilinear_to_nearest", exact=False)
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
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed.append(node.name)
    refresh_shapes(gm)
    return gm, PassReport(name="bilinear_to_nearest", nodes_changed=tuple(changed), exact=False,
                          why=f"bilinear resize is slow on {spec.name} ({spec.slow_ops['resize_bilinear']})")


# ------------------------------------------------------------------- large depthwise kernels
@register_pass("shrink_depthwise", exact=False)
def shrink_depthwise(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Centre-crop depthwise kernels larger than ``spec.max_depthwise_kernel`` (approximate).

    The padding shrinks by the same amount, so every output position keeps its centre tap and
    the output shape is unchanged; the outer ring of taps is dropped (for trained nets most of a
    large depthwise kernel's energy is near the centre; the report gives the output change).
    """
    limit = spec.max_depthwise_kernel
    if limit is None:
        return unchanged(gm, "shrink_depthwise", exact=False,
                         why=f"{spec.name} has no depthwise kernel size limit")
    gm = copy_graph_module(gm)
    changed: list[str] = []
    notes: list[str] = []
    for node in list(gm.graph.nodes):
        mod = module_of(gm, node)
        if not (isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels and mod.groups > 1):
            continue
        kh, kw = mod.kernel_size
        if max(kh, kw) <= limit:
            continue
        if (mod.dilation != (1, 1) or isinstance(mod.padding, str) or call_sites(gm, str(node.target)) != 1):
            notes.append(f"{node.name}: dilated, string padding or shared module; left alone")
            continue
        nh, nw = min(kh, limit), min(kw, limit)
        ch, cw = (kh - nh) // 2, (kw - nw) // 2
        if (kh - nh) % 2 or (kw - nw) % 2 or mod.padding[0] < ch or mod.padding[1] < cw:
            notes.append(f"{node.name}: {kh}x{kw} cannot be centre-cropped to {nh}x{nw}")
            continue
        new = copy.deepcopy(mod)
        with torch.no_grad():
            new.weight = nn.Parameter(mod.weight[:, :, ch:ch + nh, cw:cw + nw].clone())
        new.kernel_size = (nh, nw)
        new.padding = (mod.padding[0] - ch, mod.padding[1] - cw)
        set_module(gm, str(node.target), new)
        changed.append(node.name)
        notes.append(f"{node.name}: {kh}x{kw} -> {nh}x{nw}")
    refresh_shapes(gm)
    return gm, PassReport(name="shrink_depthwise", nodes_changed=tuple(changed), exact=False,
                          why=f"{spec.name} runs depthwise kernels up to {limit}x{limit} well",
                          notes=tuple(notes))


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


@register_pass("layernorm_to_batchnorm", exact=False)
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
        set_module(gm, str(node.target), bn)
        # BN runs on the NCHW tensor the first permute read, so both permutes go
        node.args = (pre.args[0],)
        post.replace_all_uses_with(node)
        gm.graph.erase_node(post)
        changed.extend([pre.name, node.name, post.name])
        notes.append(f"{node.name}: calibrated on {x.shape[0]} positions")
    refresh_shapes(gm)
    return gm, PassReport(name="layernorm_to_batchnorm", nodes_changed=tuple(changed), exact=False,
                          why=f"{spec.name} has no fast LayerNorm over channels (has_fast_layernorm=False)",
                          notes=tuple(notes))
