"""Convert a user's fx-traceable CNN into an :class:`OmniModel` by analysing its fx graph.

Channel analysis: every tensor's channel dimension (dim 1) is described by a tuple of *channel
variables* (one per ``torch.cat`` segment). Convs and linears create a fresh variable for their
output; element-wise ops between tensors (residual adds, squeeze-excite gates) unify variables;
grouped/depthwise convs and norms pass theirs through (so they share the width of their input);
anything the analysis does not understand (reshapes that move channels, attention, custom
leaves, inputs, outputs, parameters used as tensors) *freezes* the variables it touches. Every
unfrozen variable becomes one width :class:`Choice`, so every configuration is a valid network
by construction.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from omnic.core.errors import SearchError
from omnic.core.ir import as_input_tuple, symbolic_trace
from omnic.search.elastic import DepthGate, ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from omnic.search.space import Choice, SearchSpace
from omnic.search.supernet import OmniModel

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


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """How :func:`convert` builds the space.

    Attributes:
        mode: ``"autonas"`` (width, kernel, depth, resolution) or ``"fastnas"`` (width only,
            fine-grained, channels sorted by importance).
        width_ratios: AutoNAS width choices as fractions of each group's channels.
        divisor: Channel counts are multiples of this (the device's ``channel_multiple`` when a
            deployment is given); a group smaller than twice the divisor uses a smaller one.
        max_width_choices: FastNAS: at most this many widths per group.
        kernel_sizes: Kernel choices (only sizes up to each conv's own are offered).
        depth: Whether skippable residual blocks get depth choices.
        resolutions: Input resolutions to offer (None: fixed at the example input's).
        freeze: ``fnmatch`` patterns of module names to keep exactly as they are.
        choices: Per module name (or choice name): ``{"width": [...], "kernel": [...],
            "depth": [...]}`` to restrict that module's choices.
    """

    mode: str = "autonas"
    width_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    divisor: int = 8
    max_width_choices: int = 16
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    depth: bool = True
    resolutions: tuple[int, ...] | None = None
    freeze: tuple[str, ...] = ()
    choices: Mapping[str, Mapping[str, Sequence[int]]] = field(default_factory=dict)


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
class _Analysis:
    vars: _Vars
    module_io: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # elastic module -> (in, out)
    producers: dict[int, list[str]]  # var -> modules creating it, in graph order
    order: list[str]


def _analyse(gm: fx.GraphModule) -> _Analysis:
    V = _Vars()
    desc: dict[fx.Node, tuple] = {}
    module_io: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    producers: dict[int, list[str]] = {}
    order: list[str] = []
    modules = dict(gm.named_modules())

    def d(n: Any) -> tuple | None:
        if not isinstance(n, fx.Node) or _meta(n) is None:
            return None
        if n not in desc:
            m = _meta(n)
            desc[n] = (V.new(m.shape[1], frozen=True),) if len(m.shape) >= 2 else _FREEZE
        return desc[n]

    def freeze(x: tuple | None) -> None:
        if x and x is not _FREEZE:
            for v in x:
                V.freeze(v)

    def fresh(node: fx.Node, frozen: bool = True) -> tuple:
        m = _meta(node)
        if m is None:
            return _FREEZE
        return (V.new(m.shape[1], frozen=frozen),) if len(m.shape) >= 2 else _FREEZE

    def unify(a: tuple, b: tuple) -> bool:
        if a is _FREEZE or b is _FREEZE or len(a) != len(b) or \
                any(V.size[V.find(x)] != V.size[V.find(y)] for x, y in zip(a, b)):
            return False
        for x, y in zip(a, b):
            V.union(x, y)
        return True

    def record(name: str, din: tuple, dout: tuple) -> None:
        if name in module_io:  # a module called twice must have one width
            pin, pout = module_io[name]
            if not (unify(pin, din) and unify(pout, dout)):
                for x in (pin, din, pout, dout):
                    freeze(x)
            return
        module_io[name] = (din, dout)
        order.append(name)

    def passthrough_if_channels_kept(node: fx.Node, src: fx.Node) -> tuple:
        mi, mo = _meta(src), _meta(node)
        if mi is not None and mo is not None and len(mo.shape) >= 2 and len(mi.shape) >= 2 and \
                mo.shape[0] == mi.shape[0] and mo.shape[1] == mi.shape[1] and \
                math.prod(mi.shape[2:]) == math.prod(mo.shape[2:]) == 1:
            return d(src)
        freeze(d(src))
        return fresh(node)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            d(node)
            continue
        if node.op == "get_attr":
            desc[node] = _FREEZE
            continue
        if node.op == "output":
            for n in _tensor_args(node):
                freeze(d(n))
            continue
        if _meta(node) is None:  # sizes, tuples...: the values feeding it keep their channels
            if not (node.op == "call_method" and node.target in _NON_TENSOR_METHODS) and \
                    not (node.op == "call_function" and node.target in (getattr, operator.getitem)):
                for n in _tensor_args(node):
                    freeze(d(n))
            continue
        args = _tensor_args(node)
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            mod = modules[node.target]
            din = d(first)
            if isinstance(mod, nn.Conv2d) and din not in (None, _FREEZE):
                cin_g = mod.in_channels // mod.groups
                cout_g = mod.out_channels // mod.groups
                if mod.groups == 1:
                    dout = fresh(node, frozen=False)
                    producers.setdefault(dout[0], []).append(node.target)
                elif cin_g == cout_g and all(V.size[V.find(v)] % cin_g == 0 for v in din):
                    dout = din  # grouped/depthwise: whole groups come and go with the input channels
                    for v in din:
                        r = V.find(v)
                        V.gran[r] = math.lcm(V.gran[r], cin_g)
                else:
                    freeze(din)
                    dout = fresh(node)
                record(node.target, din, dout)
                desc[node] = dout
            elif isinstance(mod, nn.BatchNorm2d) and din not in (None, _FREEZE):
                record(node.target, din, din)
                desc[node] = din
            elif isinstance(mod, nn.Linear) and din not in (None, _FREEZE) and len(_meta(first).shape) == 2:
                dout = fresh(node, frozen=False)
                producers.setdefault(dout[0], []).append(node.target)
                record(node.target, din, dout)
                desc[node] = dout
            elif isinstance(mod, _PASS_MODULES) and din is not None:
                desc[node] = din
            elif isinstance(mod, nn.Flatten) and din is not None:
                desc[node] = passthrough_if_channels_kept(node, first)
            else:
                for n in args:
                    freeze(d(n))
                desc[node] = fresh(node)
            continue
        target = node.target
        is_fn = node.op == "call_function"
        tensors = [a for a in node.args if _meta(a) is not None]
        if (is_fn and target in _PASS_FUNCS) or (not is_fn and target in _PASS_METHODS):
            if _meta(first) is not None and len(tensors) == 1:
                desc[node] = d(first)
                continue
        if (is_fn and target in _BINARY_FUNCS) or (not is_fn and target in _BINARY_METHODS):
            if len(tensors) == 1 and not node.kwargs:  # tensor op scalar
                desc[node] = d(tensors[0])
                continue
            if len(tensors) == 2 and not node.kwargs:
                a, b = tensors
                ma, mb, mo = _meta(a), _meta(b), _meta(node)
                if len(ma.shape) >= 2 and len(mb.shape) >= 2 and len(mo.shape) >= 2:
                    da, db = d(a), d(b)
                    if ma.shape[1] == mb.shape[1] and unify(da, db):
                        desc[node] = da
                        continue
                    if mb.shape[1] == 1 and ma.shape[1] == mo.shape[1]:  # broadcast over channels
                        freeze(db)
                        desc[node] = da
                        continue
                    if ma.shape[1] == 1 and mb.shape[1] == mo.shape[1]:
                        freeze(da)
                        desc[node] = db
                        continue
        if is_fn and target is torch.cat:
            items = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            mo = _meta(node)
            if dim < 0:
                dim += len(mo.shape)
            parts = [d(n) for n in items]
            if dim == 1 and all(p not in (None, _FREEZE) for p in parts):
                desc[node] = tuple(v for p in parts for v in p)
                continue
            if dim == 0 and all(p not in (None, _FREEZE) for p in parts) and \
                    all(unify(parts[0], p) for p in parts[1:]):
                desc[node] = parts[0]
                continue
        if (is_fn and target in _RESHAPE_FUNCS) or (not is_fn and target in _RESHAPE_METHODS):
            if _meta(first) is not None:
                for n in args:
                    if n is not first:
                        freeze(d(n))
                desc[node] = passthrough_if_channels_kept(node, first)
                continue
        if (is_fn and target in _REDUCE_FUNCS) or (not is_fn and target in _REDUCE_METHODS):
            mi, mo = _meta(first), _meta(node)
            if mi is not None and mo is not None and len(mi.shape) >= 3 and len(mo.shape) >= 2 and \
                    mo.shape[0] == mi.shape[0] and mo.shape[1] == mi.shape[1] and len(args) == 1:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
                dims = {x % len(mi.shape) for x in dims}
                if dims and not dims & {0, 1}:
                    desc[node] = d(first)
                    continue
        # anything else: keep every channel it touches as it is
        for n in args:
            freeze(d(n))
        desc[node] = fresh(node)
    return _Analysis(vars=V, module_io=module_io, producers=producers, order=order)


def _is_residual(block: nn.Module) -> bool:
    """Whether ``block``'s input feeds an add directly (an identity shortcut)."""
    try:
        gm = fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 - an untraceable block is just not skippable
        return False
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    adds = {operator.add, operator.iadd, torch.add}
    return any((u.op == "call_function" and u.target in adds) or (u.op == "call_method" and u.target in ("add", "add_"))
               for u in inputs[0].users)


def _spatial_sizes(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Iterable[str],
                   blocks: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, tuple]]:
    """Output H*W (``name``) and input H*W (``name#in``) of the named modules; block io shapes."""
    names = set(names)
    blocks = set(blocks)
    out: dict[str, int] = {}
    io: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in names:
            def hook(mod, args, res, name=name):
                out[name] = math.prod(res.shape[2:]) if res.dim() > 2 else 1
                a = args[0]
                out[name + "#in"] = math.prod(a.shape[2:]) if a.dim() > 2 else 1
            hooks.append(m.register_forward_hook(hook))
        if name in blocks:
            def bhook(mod, args, res, name=name):
                shape_in = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
                shape_out = tuple(res.shape) if isinstance(res, torch.Tensor) else None
                io[name] = (shape_in, shape_out, io.get(name, (0, 0, 0))[2] + 1)
            hooks.append(m.register_forward_hook(bhook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, io


def _widths(size: int, gran: int, cfg: ConvertConfig) -> tuple[int, ...]:
    div = math.lcm(max(1, cfg.divisor), gran)
    while div > gran and size < 2 * div:  # a small group still gets a choice
        div //= 2
        div = math.lcm(div, gran)
        if div >= size:
            div = gran
            break
    if cfg.mode == "fastnas":
        step = div * max(1, math.ceil(size / div / cfg.max_width_choices))
        vals = set(range(step, size + 1, step))
    else:
        vals = {max(div, int(round(r * size / div)) * div) for r in cfg.width_ratios}
    vals = {v for v in vals if 0 < v <= size and v % gran == 0}
    vals.add(size)
    return tuple(sorted(vals))


def _restrict(values: tuple[int, ...], wanted: Sequence[int] | None, what: str, limit: int, gran: int = 1
              ) -> tuple[int, ...]:
    if wanted is None:
        return values
    out = tuple(sorted({int(v) for v in wanted}))
    bad = [v for v in out if v <= 0 or v > limit or v % gran]
    if not out or bad:
        raise SearchError(f"{what}: values {list(wanted)} are not allowed (each must be in 1..{limit}"
                          f"{f' and a multiple of {gran}' if gran > 1 else ''})")
    return out


def convert(model: nn.Module, example_inputs: Any, config: ConvertConfig = ConvertConfig()) -> OmniModel:
    """Turn ``model`` into an :class:`OmniModel` (the input model is not modified).

    Raises:
        TraceError: The model cannot be traced with torch.fx.
        SearchError: A restriction names an unknown module or an invalid value.
    """
    if config.mode not in ("autonas", "fastnas"):
        raise SearchError(f"unknown omnimize mode {config.mode!r}; use 'autonas' or 'fastnas'")
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        raise SearchError("omnimize needs example_inputs (a tensor shaped like one input batch)")
    model = copy.deepcopy(model).eval()
    gm = symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    A = _analyse(gm)
    V = A.vars
    named = dict(model.named_modules())
    frozen_mods = {n for n in named if n and any(fnmatch.fnmatchcase(n, p) for p in config.freeze)}
    # a frozen module under a frozen parent pattern ("layer1.*" or "layer1")
    frozen_mods |= {n for n in named if any(n.startswith(f + ".") for f in frozen_mods)}
    for pattern in config.freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in named if n):
            raise SearchError(f"freeze pattern {pattern!r} matches no module; modules are e.g. "
                              f"{', '.join(list(A.order)[:8])}")
    for name in A.order:
        if name in frozen_mods:
            din, dout = A.module_io[name]
            for v in din + dout:
                V.freeze(v)

    restrictions = dict(config.choices)
    for key in restrictions:
        if key not in named and ":" not in key and key != "resolution":
            raise SearchError(f"choices: no module named {key!r}")

    # ---- width choices: one per unfrozen channel variable
    choices: list[Choice] = []
    var_choice: dict[int, str] = {}
    groups: dict[str, dict[str, Any]] = {}
    for name in A.order:
        for v in A.module_io[name][1]:
            r = V.find(v)
            if V.frozen[r] or r in var_choice:
                continue
            prods = [m for var, ms in A.producers.items() if V.find(var) == r for m in ms]
            if not prods:
                continue
            cname = f"width:{prods[0]}"
            values = _widths(V.size[r], V.gran[r], config)
            for key in [prods[0], cname] + prods[1:]:
                if key in restrictions and "width" in restrictions[key]:
                    values = _restrict(values, restrictions[key]["width"], cname, V.size[r], V.gran[r])
            var_choice[r] = cname
            members = [m for m in A.order if any(V.find(x) == r for x in A.module_io[m][1])]
            groups[cname] = {"size": V.size[r], "granularity": V.gran[r], "modules": members}
            if len(values) > 1:
                choices.append(Choice(name=cname, kind="width", values=values, modules=tuple(members)))
    width_names = {c.name for c in choices}

    def segments(dsc: tuple) -> tuple:
        out = []
        for v in dsc:
            r = V.find(v)
            cname = var_choice.get(r)
            out.append((cname if cname in width_names else None, V.size[r]))
        return tuple(out)

    # ---- kernel choices and elastic layers
    elastic: dict[str, nn.Module] = {}
    for name in A.order:
        mod = named[name]
        din, dout = A.module_io[name]
        if isinstance(mod, nn.Conv2d):
            kchoice = None
            k = mod.kernel_size[0]
            pad = mod.padding if isinstance(mod.padding, tuple) else None
            if config.mode == "autonas" and name not in frozen_mods and mod.kernel_size[0] == mod.kernel_size[1] \
                    and k % 2 == 1 and pad == (k // 2, k // 2) and mod.dilation == (1, 1) \
                    and mod.padding_mode == "zeros":
                values = tuple(sorted({s for s in config.kernel_sizes if s <= k and s % 2 == 1} | {k}))
                r = restrictions.get(name, {})
                values = _restrict(values, r.get("kernel"), f"kernel:{name}", k)
                if any(v % 2 == 0 for v in values):
                    raise SearchError(f"kernel:{name}: kernel sizes must be odd, got {values}")
                if len(values) > 1:
                    kchoice = f"kernel:{name}"
                    choices.append(Choice(name=kchoice, kind="kernel", values=values, modules=(name,)))
            elastic[name] = ElasticConv2d.from_module(mod, segments(din), segments(dout), kchoice)
        elif isinstance(mod, nn.BatchNorm2d):
            elastic[name] = ElasticBatchNorm2d.from_module(mod, segments(dout))
        elif isinstance(mod, nn.Linear):
            elastic[name] = ElasticLinear.from_module(mod, segments(din), segments(dout))

    # ---- depth choices: trailing runs of skippable residual blocks in each nn.Sequential
    candidates = []
    if config.mode == "autonas" and config.depth:
        for sname, seq in named.items():
            if isinstance(seq, nn.Sequential):
                for i in range(1, len(seq)):
                    bname = f"{sname}.{i}" if sname else str(i)
                    if bname not in frozen_mods and len(list(seq[i].children())) > 0:
                        candidates.append(bname)
    spatial_full, block_io = _spatial_sizes(model, inputs, elastic, candidates)
    skippable = {b for b in candidates
                 if b in block_io and block_io[b][2] == 1 and block_io[b][0] == block_io[b][1]
                 and _is_residual(named[b])}
    gates: dict[str, DepthGate] = {}
    gate_plan: list[tuple[str, list[str]]] = []
    if skippable:
        for sname, seq in named.items():
            if not isinstance(seq, nn.Sequential):
                continue
            run: list[str] = []
            runs: list[list[str]] = []
            for i in range(1, len(seq) + 1):
                bname = (f"{sname}.{i}" if sname else str(i)) if i < len(seq) else None
                if bname in skippable:
                    run.append(bname)
                elif run:
                    runs.append(run)
                    run = []
            for run in runs:
                first_i, last_i = int(run[0].rsplit(".", 1)[-1]), int(run[-1].rsplit(".", 1)[-1])
                whole = first_i == 1 and last_i == len(seq) - 1
                cname = f"depth:{sname}" if whole else f"depth:{sname}.{first_i}-{last_i}"
                values = tuple(range(0, len(run) + 1))
                for key in (sname, cname):
                    if key in restrictions and "depth" in restrictions[key]:
                        values = _restrict(values, restrictions[key]["depth"], cname, len(run)) \
                            if 0 not in restrictions[key]["depth"] else tuple(sorted(restrictions[key]["depth"]))
                if len(values) > 1:
                    choices.append(Choice(name=cname, kind="depth", values=values, modules=tuple(run)))
                    gate_plan.append((cname, run))

    # ---- resolution
    spatial: dict[int, dict[str, int]] = {}
    base_res = int(inputs[0].shape[-1]) if inputs[0].dim() == 4 else None
    resolutions = restrictions.get("resolution", {}).get("resolution") if "resolution" in restrictions else None
    resolutions = tuple(resolutions or config.resolutions or ())
    if resolutions and config.mode == "autonas" and base_res is not None:
        values = tuple(sorted({int(r) for r in resolutions}))
        for r in values:
            x = (F.interpolate(inputs[0], size=(r, r), mode="bilinear", align_corners=False),) + inputs[1:]
            try:
                spatial[r], _ = _spatial_sizes(model, x, elastic)
            except Exception as exc:  # noqa: BLE001
                raise SearchError(f"the model does not run at resolution {r}: {exc}") from exc
        if len(values) > 1:
            choices.append(Choice(name="resolution", kind="resolution", values=values))
        inputs = (F.interpolate(inputs[0], size=(values[-1],) * 2, mode="bilinear", align_corners=False),
                  ) + inputs[1:] if values[-1] != base_res else inputs
        base_res = values[-1]
    else:
        spatial[base_res or 0] = spatial_full

    # ---- swap modules in (parents first resolved by name, so nesting does not matter)
    def set_child(root: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        parent._modules[child] = new

    for name, new in elastic.items():
        set_child(model, name, new)
    for cname, run in gate_plan:
        for pos, bname in enumerate(run):
            gate = DepthGate(model.get_submodule(bname), cname, pos)
            set_child(model, bname, gate)
            gates[bname] = gate
    space = SearchSpace(choices)
    return OmniModel(model, space, mode=config.mode, example_inputs=inputs, elastic=elastic, gates=gates,
                     spatial=spatial, groups=groups, base_resolution=base_res)
