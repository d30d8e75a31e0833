"""Channel analysis of a traced model: which channel dimensions may shrink together.

Every tensor's channel dimension (dim 1) is described by a tuple of *channel variables* (one per
``torch.cat`` segment). Convs and linears create a fresh variable for their output; element-wise
ops between tensors (residual adds, squeeze-excite gates) unify variables; grouped/depthwise convs
and norms pass theirs through (so they share the width of their input); anything the analysis does
not understand (reshapes that move channels, attention, custom leaves, inputs, outputs, parameters
used as tensors) *freezes* the variables it touches.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh,
                 nn.LeakyReLU, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_PASS_FUNCS = {F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh,
               F.gelu, F.silu, F.leaky_relu, F.elu, F.mish, F.dropout, F.max_pool2d, F.avg_pool2d,
               F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, torch.clamp, operator.neg,
               torch.nn.functional.hardtanh}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "contiguous", "clone", "float",
                 "hardswish", "neg", "detach"}
_BINARY_FUNCS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
                 operator.sub, torch.sub, operator.truediv, torch.div, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}
_RESHAPE_FUNCS = {torch.flatten, torch.squeeze, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_NON_TENSOR_METHODS = {"size", "dim"}

_FREEZE = ("<freeze>",)  # descriptor of tensors whose channels must stay as they are


class _Vars:
    """Union-find over channel variables, with sizes, a frozen flag and a channel granularity."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: list[bool] = []
        self.gran: list[int] = []

    def new(self, size: int, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.frozen.append(frozen)
        self.gran.append(1)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # should not happen for valid models; stay safe
            self.frozen[ra] = self.frozen[rb] = True
            return
        self.parent[rb] = ra
        self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
        self.gran[ra] = math.lcm(self.gran[ra], self.gran[rb])

    def freeze(self, v: int) -> None:
        self.frozen[self.find(v)] = True


def _meta(node: Any) -> TensorMetadata | None:
    if isinstance(node, fx.Node):
        m = node.meta.get("tensor_meta")
        return m if isinstance(m, TensorMetadata) else None
    return None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return [n for n in out if _meta(n) is not None]


@dataclass
class Analysis:
    vars: _Vars
    module_io: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # elastic module -> (in, out)
    producers: dict[int, list[str]]  # var -> modules creating it, in graph order
    order: list[str]


class _ChannelAnalysis:
    """One pass over the graph in order; each node gets a descriptor (tuple of variables)."""

    def __init__(self, gm: fx.GraphModule):
        self.V = _Vars()
        self.desc: dict[fx.Node, tuple] = {}
        self.module_io: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.producers: dict[int, list[str]] = {}
        self.order: list[str] = []
        self.modules = dict(gm.named_modules())

    # ------------------------------------------------------------------ descriptors
    def d(self, n: Any) -> tuple | None:
        """The descriptor of ``n`` (a frozen fresh variable for tensors not seen yet)."""
        if not isinstance(n, fx.Node) or _meta(n) is None:
            return None
        if n not in self.desc:
            m = _meta(n)
            self.desc[n] = (self.V.new(m.shape[1], frozen=True),) if len(m.shape) >= 2 else _FREEZE
        return self.desc[n]

    def freeze(self, x: tuple | None) -> None:
        if x and x is not _FREEZE:
            for v in x:
                self.V.freeze(v)

    def fresh(self, node: fx.Node, frozen: bool = True) -> tuple:
        m = _meta(node)
        if m is None:
            return _FREEZE
        return (self.V.new(m.shape[1], frozen=frozen),) if len(m.shape) >= 2 else _FREEZE

    def unify(self, a: tuple, b: tuple) -> bool:
        V = self.V
        if a is _FREEZE or b is _FREEZE or len(a) != len(b) or \
                any(V.size[V.find(x)] != V.size[V.find(y)] for x, y in zip(a, b)):
            return False
        for x, y in zip(a, b):
            V.union(x, y)
        return True

    def record(self, name: str, din: tuple, dout: tuple) -> None:
        if name in self.module_io:  # a module called twice must have one width
            pin, pout = self.module_io[name]
            if not (self.unify(pin, din) and self.unify(pout, dout)):
                for x in (pin, din, pout, dout):
                    self.freeze(x)
            return
        self.module_io[name] = (din, dout)
        self.order.append(name)

    def passthrough_if_channels_kept(self, node: fx.Node, src: fx.Node) -> tuple:
        mi, mo = _meta(src), _meta(node)
        if mi is not None and mo is not None and len(mo.shape) >= 2 and len(mi.shape) >= 2 and \
                mo.shape[0] == mi.shape[0] and mo.shape[1] == mi.shape[1] and \
                math.prod(mi.shape[2:]) == math.prod(mo.shape[2:]) == 1:
            return self.d(src)
        self.freeze(self.d(src))
        return self.fresh(node)

    def freeze_all(self, node: fx.Node) -> tuple:
        """The fallback: keep every channel ``node`` touches as it is."""
        for n in _tensor_args(node):
            self.freeze(self.d(n))
        return self.fresh(node)

    # ------------------------------------------------------------------ nodes
    def run(self, gm: fx.GraphModule) -> Analysis:
        for node in gm.graph.nodes:
            self.visit(node)
        return Analysis(vars=self.V, module_io=self.module_io, producers=self.producers, order=self.order)

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.d(node)
        elif node.op == "get_attr":
            self.desc[node] = _FREEZE
        elif node.op == "output":
            for n in _tensor_args(node):
                self.freeze(self.d(n))
        elif _meta(node) is None:  # sizes, tuples...: the values feeding it keep their channels
            if not (node.op == "call_method" and node.target in _NON_TENSOR_METHODS) and \
                    not (node.op == "call_function" and node.target in (getattr, operator.getitem)):
                for n in _tensor_args(node):
                    self.freeze(self.d(n))
        elif node.op == "call_module":
            self.desc[node] = self.call_module(node)
        else:
            out = None
            for handler in (self.pointwise, self.binary, self.cat, self.reshape, self.reduce):
                out = handler(node)
                if out is not None:
                    break
            self.desc[node] = out if out is not None else self.freeze_all(node)

    def call_module(self, node: fx.Node) -> tuple:
        mod = self.modules[node.target]
        first = node.args[0] if node.args else None
        din = self.d(first)
        known = din not in (None, _FREEZE)
        if isinstance(mod, nn.Conv2d) and known:
            return self.conv(node, mod, din)
        if isinstance(mod, nn.BatchNorm2d) and known:
            self.record(node.target, din, din)
            return din
        if isinstance(mod, nn.Linear) and known and len(_meta(first).shape) == 2:
            dout = self.fresh(node, frozen=False)
            self.producers.setdefault(dout[0], []).append(node.target)
            self.record(node.target, din, dout)
            return dout
        if isinstance(mod, _PASS_MODULES) and din is not None:
            return din
        if isinstance(mod, nn.Flatten) and din is not None:
            return self.passthrough_if_channels_kept(node, first)
        return self.freeze_all(node)

    def conv(self, node: fx.Node, mod: nn.Conv2d, din: tuple) -> tuple:
        V = self.V
        cin_g = mod.in_channels // mod.groups
        cout_g = mod.out_channels // mod.groups
        if mod.groups == 1:
            dout = self.fresh(node, frozen=False)
            self.producers.setdefault(dout[0], []).append(node.target)
        elif cin_g == cout_g and all(V.size[V.find(v)] % cin_g == 0 for v in din):
            dout = din  # grouped/depthwise: whole groups come and go with the input channels
            for v in din:
                r = V.find(v)
                V.gran[r] = math.lcm(V.gran[r], cin_g)
        else:
            self.freeze(din)
            dout = self.fresh(node)
        self.record(node.target, din, dout)
        return dout

    @staticmethod
    def _is(node: fx.Node, funcs: set, methods: set) -> bool:
        return (node.target in funcs) if node.op == "call_function" else (node.target in methods)

    @staticmethod
    def _tensors(node: fx.Node) -> list:
        return [a for a in node.args if _meta(a) is not None]

    def pointwise(self, node: fx.Node) -> tuple | None:
        first = node.args[0] if node.args else None
        if self._is(node, _PASS_FUNCS, _PASS_METHODS) and _meta(first) is not None and len(self._tensors(node)) == 1:
            return self.d(first)
        return None

    def binary(self, node: fx.Node) -> tuple | None:
        if not self._is(node, _BINARY_FUNCS, _BINARY_METHODS) or node.kwargs:
            return None
        tensors = self._tensors(node)
        if len(tensors) == 1:  # tensor op scalar
            return self.d(tensors[0])
        if len(tensors) != 2:
            return None
        a, b = tensors
        ma, mb, mo = _meta(a), _meta(b), _meta(node)
        if len(ma.shape) < 2 or len(mb.shape) < 2 or len(mo.shape) < 2:
            return None
        da, db = self.d(a), self.d(b)
        if ma.shape[1] == mb.shape[1] and self.unify(da, db):
            return da
        if mb.shape[1] == 1 and ma.shape[1] == mo.shape[1]:  # broadcast over channels
            self.freeze(db)
            return da
        if ma.shape[1] == 1 and mb.shape[1] == mo.shape[1]:
            self.freeze(da)
            return db
        return None

    def cat(self, node: fx.Node) -> tuple | None:
        if node.op != "call_function" or node.target is not torch.cat:
            return None
        items = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim < 0:
            dim += len(_meta(node).shape)
        parts = [self.d(n) for n in items]
        if dim == 1 and all(p not in (None, _FREEZE) for p in parts):
            return tuple(v for p in parts for v in p)
        if dim == 0 and all(p not in (None, _FREEZE) for p in parts) and \
                all(self.unify(parts[0], p) for p in parts[1:]):
            return parts[0]
        return None

    def reshape(self, node: fx.Node) -> tuple | None:
        first = node.args[0] if node.args else None
        if not self._is(node, _RESHAPE_FUNCS, _RESHAPE_METHODS) or _meta(first) is None:
            return None
        for n in _tensor_args(node):
            if n is not first:
                self.freeze(self.d(n))
        return self.passthrough_if_channels_kept(node, first)

    def reduce(self, node: fx.Node) -> tuple | None:
        """Reductions over spatial dims only keep the channels (``x.mean((2, 3))``)."""
        if not self._is(node, _REDUCE_FUNCS, _REDUCE_METHODS):
            return None
        first = node.args[0] if node.args else None
        mi, mo = _meta(first), _meta(node)
        if mi is None or mo is None or len(mi.shape) < 3 or len(mo.shape) < 2 or mo.shape[0] != mi.shape[0] or \
                mo.shape[1] != mi.shape[1] or len(_tensor_args(node)) != 1:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        dims = {x % len(mi.shape) for x in dims}
        return self.d(first) if dims and not dims & {0, 1} else None


def analyse(gm: fx.GraphModule) -> Analysis:
    """The channel variables of ``gm`` (shape-propagated), the elastic modules' input/output
    descriptors in graph order, and which modules produce each variable."""
    return _ChannelAnalysis(gm).run(gm)
