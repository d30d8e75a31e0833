"""Exact passes: rewrites that keep outputs equal up to float rounding, on every device.

They are still measured before ``nas.adapt`` keeps them: omnic's lowering already folds
conv+BN (``torch.fx`` ``fuse`` before export), so some of them only make the graph smaller for
the user and cost nothing, and the report says so.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from omnic.core.targets import DeviceSpec
from omnic.passes.base import PassReport, call_sites, copy_graph_module, finish, module_of, pair, replace_node, shape_of

_ALL_DEVICES = "exact on every device"


# --------------------------------------------------------------------------- BatchNorm folding
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Fold eval-mode BatchNorm into the conv or linear layer that feeds it.

    The producer must feed only the BatchNorm and be called once (a shared module would change
    its other call sites). ``y = (Wx + b - mean) / sqrt(var + eps) * gamma + beta`` is again a conv.
    """
    gm = copy_graph_module(gm)
    changed: list[str] = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BN_TYPES) or bn.training or not bn.track_running_stats:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1 or call_sites(gm, str(src.target)) != 1:
            continue
        prod = module_of(gm, src)
        if isinstance(prod, _CONV_TYPES) and not prod.transposed:
            fused = fuse_conv_bn_eval(prod, bn)
        elif isinstance(prod, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and len(shape_of(src) or ()) == 2:
            fused = fuse_linear_bn_eval(prod, bn)
        else:
            continue
        gm.set_submodule(str(src.target), fused)
        replace_node(gm, node, src, changed)
    return finish(gm, "fold_batchnorm", changed, exact=True,
                  why=f"{_ALL_DEVICES}: one conv instead of a conv and a per-channel affine")


# ------------------------------------------------------------------------------ no-op removal
_NOOP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_DROPOUT_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}
_SAME_SHAPE_IS_NOOP = {"reshape", "view", "flatten", "squeeze", "unsqueeze", "expand", "expand_as",
                       "view_as", "reshape_as", "contiguous"}
_SAME_SHAPE_FNS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
# x op c with this constant leaves x unchanged
_IDENTITY_CONST = {operator.mul: 1, operator.truediv: 1, operator.add: 0, operator.sub: 0,
                   torch.mul: 1, torch.add: 0, torch.sub: 0, torch.div: 1}


def _noop_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input ``node`` passes through unchanged, or None when it does real work."""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_module":
        return first if isinstance(module_of(gm, node), _NOOP_MODULES) else None
    if node.op == "call_function" and node.target in _DROPOUT_FNS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return first if training is False else None
    same_shape = shape_of(node) is not None and shape_of(node) == shape_of(first) and (
        node.meta["tensor_meta"].dtype == first.meta["tensor_meta"].dtype)
    if not same_shape:
        return None
    name = node.target if node.op == "call_method" else None
    if name in _SAME_SHAPE_IS_NOOP or (node.op == "call_function" and node.target in _SAME_SHAPE_FNS):
        return first
    if name == "permute" or (node.op == "call_function" and node.target is torch.permute):
        dims = node.args[1:] if name == "permute" else node.args[1]
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        rank = len(shape_of(first) or ())
        return first if tuple(d % rank for d in dims) == tuple(range(rank)) else None
    if name == "transpose" or (node.op == "call_function" and node.target is torch.transpose):
        rank = len(shape_of(first) or ())
        a, b = node.args[1], node.args[2]
        return first if a % rank == b % rank else None
    if node.op == "call_function" and node.target in _IDENTITY_CONST and len(node.args) == 2:
        const = node.args[1]
        if isinstance(const, (int, float)) and not isinstance(const, bool) and const == _IDENTITY_CONST[node.target]:
            return first
    return None


def remove_noops(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Remove dropout (eval), ``nn.Identity``, ``contiguous()``, reshapes/views/flattens that keep
    the shape, identity permutes/transposes and ``x * 1`` / ``x + 0``.

    The importer turns most of these into copies or reshapes that TVM may or may not elide; the
    graph is smaller either way, and nothing the user sees changes.
    """
    gm = copy_graph_module(gm)
    changed: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        src = _noop_input(gm, node)
        if src is None:
            continue
        replace_node(gm, node, src, changed)
    return finish(gm, "remove_noops", changed, exact=True,
                  why=f"{_ALL_DEVICES}: fewer graph nodes, no work removed from the outputs")


# -------------------------------------------------------------------------- pointwise algebra
_AFFINE_FNS = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
               torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div"}
_AFFINE_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _affine(node: fx.Node) -> tuple[fx.Node, float, float] | None:
    """``node`` as ``a * x + b`` over one tensor input ``x`` with Python-scalar ``a``, ``b``."""
    meta = node.meta.get("tensor_meta")
    # only floating tensors: shape arithmetic on Python ints and integer tensors must stay integral
    if node.kwargs or len(node.args) != 2 or meta is None or not getattr(meta, "dtype", torch.int64).is_floating_point:
        return None
    if node.op == "call_function":
        kind = _AFFINE_FNS.get(node.target)
    elif node.op == "call_method":
        kind = _AFFINE_METHODS.get(node.target)
    else:
        kind = None
    if kind is None:
        return None
    lhs, rhs = node.args
    if isinstance(lhs, fx.Node) and _is_scalar(rhs):
        c = float(rhs)
        return {"add": (lhs, 1.0, c), "sub": (lhs, 1.0, -c), "mul": (lhs, c, 0.0),
                "div": (lhs, 1.0 / c, 0.0) if c != 0 else None}[kind]
    if isinstance(rhs, fx.Node) and _is_scalar(lhs) and node.op == "call_function":
        c = float(lhs)
        return {"add": (rhs, 1.0, c), "sub": (rhs, -1.0, c), "mul": (rhs, c, 0.0), "div": None}[kind]
    return None


def fuse_pointwise(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Collapse chains of scalar multiply/add/subtract/divide, and fold them into a preceding
    conv or linear layer where there is one.

    What is meaningful here: TVM's ``FuseOps`` already puts consecutive elementwise ops into the
    loop nest of their producer, so "fusing" them into one kernel gains nothing. What TVM does
    not do is the algebra: ``(x * a) * b + c`` still costs three arithmetic passes per element
    inside the fused kernel, and Relax has no ``FoldScaleAxis`` to push a scale into conv
    weights. This pass composes such a chain into one ``a * x + b`` and, when the chain starts
    at a conv/linear output used only by the chain, folds it into the weights and bias, which
    removes the arithmetic altogether. Float rounding differs only in the last bits.
    """
    gm = copy_graph_module(gm)
    changed: list[str] = []
    # walk backwards so each chain is handled once, from its last node
    erased: set[str] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node.name in erased or _affine(node) is None:
            continue
        # only start at the tail of a chain (a user that continues it will handle it)
        if len(node.users) == 1 and _affine(next(iter(node.users))) is not None:
            continue
        chain = [node]
        x, a, b = _affine(node)
        while len(x.users) == 1:
            inner = _affine(x)
            if inner is None:
                break
            chain.append(x)
            x, a2, b2 = inner
            a, b = a * a2, a * b2 + b  # a*(a2*x + b2) + b
        folded = False
        if len(x.users) == 1 and x.op == "call_module" and call_sites(gm, str(x.target)) == 1:
            mod = module_of(gm, x)
            if isinstance(mod, (nn.Linear,) + _CONV_TYPES) and not getattr(mod, "transposed", False):
                with torch.no_grad():
                    mod.weight.mul_(a)
                    bias = mod.bias if mod.bias is not None else torch.zeros(mod.weight.shape[0])
                    mod.bias = nn.Parameter(bias * a + b)
                node.replace_all_uses_with(x)
                folded = True
        if not folded:
            ops_needed = (a != 1.0) + (b != 0.0)
            if len(chain) <= ops_needed:
                continue
            with gm.graph.inserting_before(node):  # each new node lands before the chain's tail
                out = x
                if a != 1.0:
                    out = gm.graph.call_function(operator.mul, (out, a))
                if b != 0.0:
                    out = gm.graph.call_function(operator.add, (out, b))
            node.replace_all_uses_with(out)
        for dead in chain:
            gm.graph.erase_node(dead)
            erased.add(dead.name)
        changed.extend(n.name for n in chain)
    return finish(gm, "fuse_pointwise", changed, exact=True,
                  why=f"{_ALL_DEVICES}: TVM fuses elementwise kernels but keeps every "
                      "multiply/add; composing them (or folding into the conv) removes work")


# ------------------------------------------------------------------------ adaptive avg pooling
def adaptive_pool_to_mean(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """``AdaptiveAvgPool2d(1)`` -> ``mean(dim=(-2, -1), keepdim=True)``; ``AdaptiveAvgPool2d(k)``
    with the input size a multiple of ``k`` -> ``avg_pool2d`` with a fixed window (both exact).

    Adaptive pooling lowers to a generic kernel that computes each window's start and end with
    integer division per output element; a mean is a plain reduction that every schedule knows.
    Other output sizes (windows of unequal size) are left alone.
    """
    gm = copy_graph_module(gm)
    changed: list[str] = []
    notes: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(module_of(gm, node), nn.AdaptiveAvgPool2d):
            out_size = module_of(gm, node).output_size
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            out_size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        else:
            continue
        x = node.args[0]
        shape = shape_of(x)
        if shape is None or len(shape) < 3:
            continue
        h, w = shape[-2:]
        oh, ow = pair(out_size)
        oh, ow = oh or h, ow or w
        with gm.graph.inserting_after(node):
            if (oh, ow) == (1, 1):
                new = gm.graph.call_function(torch.mean, (x,), {"dim": (-2, -1), "keepdim": True})
            elif (oh, ow) == (h, w):
                new = x
            elif h % oh == 0 and w % ow == 0:
                kernel = (h // oh, w // ow)
                new = gm.graph.call_function(F.avg_pool2d, (x, kernel, kernel))
            else:
                notes.append(f"{node.name}: {h}x{w} -> {oh}x{ow} has unequal windows; left alone")
                continue
        replace_node(gm, node, new, changed)
    return finish(gm, "adaptive_pool_to_mean", changed, exact=True,
                  why=f"{_ALL_DEVICES}: a fixed-window mean instead of the generic adaptive kernel", notes=notes)
