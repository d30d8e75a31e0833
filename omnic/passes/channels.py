"""Channel passes: pad channel counts to the device's multiple, shrink large depthwise kernels.

Driven by the device's ``channel_multiple`` and ``max_depthwise_kernel`` fields of its
:class:`~omnic.core.targets.DeviceSpec`, never by its name. A pass that does not apply to a
device returns a copy of its input and says why in the report.
"""
from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from omnic.core.targets import DeviceSpec
from omnic.passes.base import (PassReport, call_sites, copy_graph_module, finish, module_of, op_name, shape_of,
                               unchanged)


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
                gm.set_submodule(str(n.target), _padded_module(m, out_to=padded, in_to=in_to))
                changed.append(n.name)
        for n in group["consumers"] - group["producers"]:
            gm.set_submodule(str(n.target), _padded_module(module_of(gm, n), out_to=None, in_to=padded))
            changed.append(n.name)
        tried.update(n.name for n in group["producers"])
        notes.append(f"{node.name}: {channels} -> {padded} channels ({len(group['producers'])} producers, "
                     f"{len(group['consumers'])} consumers)")
    return finish(gm, "pad_channels", list(dict.fromkeys(changed)), exact=True,
                  why=f"{spec.name} prefers channel counts in multiples of {multiple}", notes=notes)


# ------------------------------------------------------------------- large depthwise kernels
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
        gm.set_submodule(str(node.target), new)
        changed.append(node.name)
        notes.append(f"{node.name}: {kh}x{kw} -> {nh}x{nw}")
    return finish(gm, "shrink_depthwise", changed, exact=False,
                  why=f"{spec.name} runs depthwise kernels up to {limit}x{limit} well", notes=notes)
