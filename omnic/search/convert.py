"""Convert a user's fx-traceable CNN into an :class:`OmniModel` by analysing its fx graph.

The channel analysis (:mod:`omnic.search.analysis`) groups channel dimensions that must keep one
width; every unfrozen group becomes one width :class:`Choice`, so every configuration is a valid
network by construction. Convs with odd square kernels get kernel choices, trailing runs of
skippable residual blocks depth choices, and the input optionally a resolution choice.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from omnic.core.errors import SearchError
from omnic.core.ir import as_input_tuple, symbolic_trace
from omnic.search.analysis import Analysis, analyse
from omnic.search.elastic import DepthGate, ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from omnic.search.space import Choice, SearchSpace
from omnic.search.supernet import OmniModel


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


def _is_identity_module(module: nn.Module) -> bool:
    """Whether calling ``module`` returns its input unchanged at inference (an identity shortcut
    written as a module: ``nn.Identity()``, an empty ``nn.Sequential``, a dropout)."""
    if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)):
        return True
    return isinstance(module, nn.Sequential) and all(_is_identity_module(m) for m in module)


def _is_residual(block: nn.Module) -> bool:
    """Whether ``block``'s input reaches an add unchanged (an identity shortcut): directly, or
    through modules that are the identity (``self.shortcut = nn.Identity()``, the timm style)."""
    try:
        gm = fx.symbolic_trace(block)
    except Exception:  # noqa: BLE001 - an untraceable block is just not skippable
        return False
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    modules = dict(gm.named_modules())
    adds = {operator.add, operator.iadd, torch.add}
    same = [inputs[0]]  # nodes whose value is the block's input
    for node in same:
        for u in node.users:
            if (u.op == "call_function" and u.target in adds) or (u.op == "call_method" and u.target in ("add", "add_")):
                return True
            if u.op == "call_module" and _is_identity_module(modules[u.target]) and u not in same:
                same.append(u)
    return False


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


def _frozen_modules(named: Mapping[str, nn.Module], A: Analysis, config: ConvertConfig) -> set[str]:
    """Modules matching a ``freeze`` pattern (and their submodules); their channels are frozen."""
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
                A.vars.freeze(v)
    return frozen_mods


def _restrictions(named: Mapping[str, nn.Module], config: ConvertConfig) -> dict[str, Mapping[str, Sequence[int]]]:
    restrictions = dict(config.choices)
    for key in restrictions:
        if key not in named and ":" not in key and key != "resolution":
            raise SearchError(f"choices: no module named {key!r}")
    return restrictions


def _width_choices(A: Analysis, config: ConvertConfig, restrictions: Mapping[str, Any], choices: list[Choice]
                   ) -> tuple[Callable[[tuple], tuple], dict[str, dict[str, Any]]]:
    """One width choice per unfrozen channel variable (appended to ``choices``).

    Returns:
        ``segments(descriptor)``: the ``(choice name or None, size)`` per variable that elastic
        layers slice by, and the width groups (size, granularity, modules) by choice name.
    """
    V = A.vars
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

    return segments, groups


def _kernel_choice(name: str, mod: nn.Conv2d, config: ConvertConfig, restrictions: Mapping[str, Any]
                   ) -> Choice | None:
    """Smaller odd kernels for a conv with an odd square kernel and "same" zero padding."""
    k = mod.kernel_size[0]
    pad = mod.padding if isinstance(mod.padding, tuple) else None
    if not (mod.kernel_size[0] == mod.kernel_size[1] and k % 2 == 1 and pad == (k // 2, k // 2)
            and mod.dilation == (1, 1) and mod.padding_mode == "zeros"):
        return None
    values = tuple(sorted({s for s in config.kernel_sizes if s <= k and s % 2 == 1} | {k}))
    values = _restrict(values, restrictions.get(name, {}).get("kernel"), f"kernel:{name}", k)
    if any(v % 2 == 0 for v in values):
        raise SearchError(f"kernel:{name}: kernel sizes must be odd, got {values}")
    return Choice(name=f"kernel:{name}", kind="kernel", values=values, modules=(name,)) if len(values) > 1 else None


def _elastic_layers(named: Mapping[str, nn.Module], A: Analysis, config: ConvertConfig, frozen_mods: set[str],
                    restrictions: Mapping[str, Any], segments: Callable[[tuple], tuple], choices: list[Choice]
                    ) -> dict[str, nn.Module]:
    """An elastic twin of every analysed conv, BatchNorm and linear (kernel choices appended)."""
    elastic: dict[str, nn.Module] = {}
    for name in A.order:
        mod = named[name]
        din, dout = A.module_io[name]
        if isinstance(mod, nn.Conv2d):
            kchoice = None
            if config.mode == "autonas" and name not in frozen_mods:
                choice = _kernel_choice(name, mod, config, restrictions)
                if choice is not None:
                    kchoice = choice.name
                    choices.append(choice)
            elastic[name] = ElasticConv2d.from_module(mod, segments(din), segments(dout), kchoice)
        elif isinstance(mod, nn.BatchNorm2d):
            elastic[name] = ElasticBatchNorm2d.from_module(mod, segments(dout))
        elif isinstance(mod, nn.Linear):
            elastic[name] = ElasticLinear.from_module(mod, segments(din), segments(dout))
    return elastic


def _depth_candidates(named: Mapping[str, nn.Module], frozen_mods: set[str], config: ConvertConfig) -> list[str]:
    """Blocks after the first of each ``nn.Sequential`` that could be skipped (checked later)."""
    candidates = []
    if config.mode == "autonas" and config.depth:
        for sname, seq in named.items():
            if isinstance(seq, nn.Sequential):
                for i in range(1, len(seq)):
                    bname = f"{sname}.{i}" if sname else str(i)
                    if bname not in frozen_mods and len(list(seq[i].children())) > 0:
                        candidates.append(bname)
    return candidates


def _skippable_runs(seq: nn.Sequential, sname: str, skippable: set[str]) -> list[list[str]]:
    """Runs of consecutive skippable blocks of ``seq`` (its first block is never one)."""
    run: list[str] = []
    runs: list[list[str]] = []
    for i in range(1, len(seq) + 1):
        bname = (f"{sname}.{i}" if sname else str(i)) if i < len(seq) else None
        if bname in skippable:
            run.append(bname)
        elif run:
            runs.append(run)
            run = []
    return runs


def _depth_choices(named: Mapping[str, nn.Module], candidates: list[str], block_io: Mapping[str, tuple],
                   restrictions: Mapping[str, Any], choices: list[Choice]) -> list[tuple[str, list[str]]]:
    """Depth choices over the trailing runs of skippable residual blocks (appended to ``choices``).

    Returns:
        ``(choice name, block names)`` per depth choice, for the gates.
    """
    skippable = {b for b in candidates
                 if b in block_io and block_io[b][2] == 1 and block_io[b][0] == block_io[b][1]
                 and _is_residual(named[b])}
    gate_plan: list[tuple[str, list[str]]] = []
    if not skippable:
        return gate_plan
    for sname, seq in named.items():
        if not isinstance(seq, nn.Sequential):
            continue
        for run in _skippable_runs(seq, sname, skippable):
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
    return gate_plan


def _resolution_choice(model: nn.Module, inputs: tuple[torch.Tensor, ...], elastic: Mapping[str, nn.Module],
                       spatial_full: dict[str, int], config: ConvertConfig, restrictions: Mapping[str, Any],
                       choices: list[Choice]) -> tuple[dict[int, dict[str, int]], tuple, int | None]:
    """The resolution choice (appended to ``choices``) and the spatial sizes at each resolution.

    Returns:
        Spatial sizes by resolution, the example inputs at the largest resolution, and it.
    """
    spatial: dict[int, dict[str, int]] = {}
    base_res = int(inputs[0].shape[-1]) if inputs[0].dim() == 4 else None
    resolutions = restrictions.get("resolution", {}).get("resolution") if "resolution" in restrictions else None
    resolutions = tuple(resolutions or config.resolutions or ())
    if not (resolutions and config.mode == "autonas" and base_res is not None):
        spatial[base_res or 0] = spatial_full
        return spatial, inputs, base_res
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
    return spatial, inputs, values[-1]


def _swap_in(model: nn.Module, elastic: Mapping[str, nn.Module], gate_plan: list[tuple[str, list[str]]]
             ) -> dict[str, DepthGate]:
    """Put the elastic layers, then the depth gates around their blocks, into ``model`` (by name,
    so nesting does not matter)."""
    for name, new in elastic.items():
        model.set_submodule(name, new)
    gates: dict[str, DepthGate] = {}
    for cname, run in gate_plan:
        for pos, bname in enumerate(run):
            gate = DepthGate(model.get_submodule(bname), cname, pos)
            model.set_submodule(bname, gate)
            gates[bname] = gate
    return gates


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
    was_training = model.training
    model = copy.deepcopy(model).eval()  # eval while shapes are propagated (no BN statistics updates)
    gm = symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    A = analyse(gm)
    named = dict(model.named_modules())
    frozen_mods = _frozen_modules(named, A, config)
    restrictions = _restrictions(named, config)
    choices: list[Choice] = []  # every step appends its choices, in this order
    segments, groups = _width_choices(A, config, restrictions, choices)
    elastic = _elastic_layers(named, A, config, frozen_mods, restrictions, segments, choices)
    candidates = _depth_candidates(named, frozen_mods, config)
    spatial_full, block_io = _spatial_sizes(model, inputs, elastic, candidates)
    gate_plan = _depth_choices(named, candidates, block_io, restrictions, choices)
    spatial, inputs, base_res = _resolution_choice(model, inputs, elastic, spatial_full, config, restrictions,
                                                   choices)
    gates = _swap_in(model, elastic, gate_plan)
    omni = OmniModel(model, SearchSpace(choices), mode=config.mode, example_inputs=inputs, elastic=elastic,
                     gates=gates, spatial=spatial, groups=groups, base_resolution=base_res)
    # the supernet takes the mode of the model it was made from, and export() keeps it: an eval-mode
    # model gives eval-mode subnets (left in training mode they would use batch statistics)
    return omni.train(was_training)
