"""A differential fuzzer's model generator (after NNSmith): random, valid, fx-traceable models.

A model is drawn as plain data, a :class:`ModelSpec`: a small DAG of :class:`Node` s over the
operators in :mod:`tests.fuzz.ops`, each with its output shape recorded. Every candidate node is
run once on zeros while it is drawn, so a spec is valid by construction (no shape formula to get
wrong); one that fails, or grows too big, is redrawn. Specs print as Python, so any finding is a
copy-paste repro, and :func:`minimise` cuts a failing spec down to the fewest nodes that still fail.

Drawing goes through a :class:`Drawer`, so the same generator serves hypothesis (CI, derandomised)
and ``random.Random`` (the benchmark, one seed per model).
"""
from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from omnic.compile.check import SCALE_FLOOR
from tests.fuzz.ops import ACTIVATIONS, OPS

MAX_ELEMENTS = 12_000  # per tensor: keeps each model's compile and run in the milliseconds
TOLERANCE_FP32 = 1e-4  # the relative error the issue allows fp32 builds


class Drawer(Protocol):
    def int(self, lo: int, hi: int) -> int: ...
    def pick(self, seq: Sequence[Any]) -> Any: ...


class RandomDrawer:
    """Draws from a seeded ``random.Random`` (the benchmark: model ``i`` is seed ``i``)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]


class HypothesisDrawer:
    """Draws through hypothesis' ``draw`` (inside ``st.composite``), so examples replay and shrink."""

    def __init__(self, draw: Callable):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.draw(self.st.sampled_from(list(seq)))


@dataclasses.dataclass(frozen=True)
class Node:
    """One op: ``OPS[op](**dict(params))`` applied to the outputs of nodes ``inputs``."""

    op: str
    params: tuple = ()
    inputs: tuple = ()
    shape: tuple = ()

    @property
    def label(self) -> str:
        """The op and its variant, as counted in the coverage table (``conv:depthwise``, ``act:gelu``)."""
        p = dict(self.params)
        if self.op == "conv":
            groups, cin, k = p["groups"], p["cin"], p["k"]
            kind = "depthwise" if groups == cin and cin > 1 else "grouped" if groups > 1 else (
                "pointwise" if k == 1 else "plain")
            return f"conv:{kind}"
        for key in ("fn", "mode", "impl"):
            if key in p:
                return f"{self.op}:{p[key]}"
        return self.op


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model: node 0 is the input; ``outputs`` are the nodes returned (a tuple when several)."""

    input_shape: tuple
    nodes: tuple
    outputs: tuple
    seed: int = 0

    def labels(self) -> list[str]:
        return [n.label for n in self.nodes[1:]]


class FuzzModel(torch.nn.Module):
    """The module a spec describes; weights come from ``torch.manual_seed(spec.seed)``."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.layers = torch.nn.ModuleList([OPS[n.op](**dict(n.params)) for n in spec.nodes[1:]])

    def forward(self, x):
        values = [x]
        for node, layer in zip(self.spec.nodes[1:], self.layers):
            values.append(layer(*[values[i] for i in node.inputs]))
        outs = [values[i] for i in self.spec.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def build(spec: ModelSpec) -> FuzzModel:
    """The eval-mode module for ``spec``."""
    return FuzzModel(spec).eval()


def example_input(spec: ModelSpec, which: int = 0) -> torch.Tensor:
    """Input ``which`` for ``spec`` (0: the example the model is compiled with; 1: a second check)."""
    gen = torch.Generator().manual_seed(spec.seed * 7919 + which)
    return torch.randn(spec.input_shape, generator=gen)


# ------------------------------------------------------------------------------------ drawing
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _kind(shape: tuple) -> str:
    return {4: "img", 3: "seq", 2: "vec"}[len(shape)]


def _draw_image_op(d: Drawer, shape: tuple) -> tuple[str, dict]:
    _, c, h, w = shape
    op = d.pick(["conv", "conv", "conv", "act", "act", "batchnorm", "groupnorm", "layernorm", "maxpool",
                 "avgpool", "adaptive_avgpool", "upsample", "se", "transpose_hw", "reshape", "split",
                 "image_to_seq", "global_pool", "flatten"])
    if op == "conv":
        variant = d.pick(["plain", "pointwise", "depthwise", "grouped"])
        k = 1 if variant == "pointwise" else d.pick([1, 3, 5, 7])
        dil = d.pick([1, 1, 2]) if k > 1 else 1
        pad_rule = d.pick(["same", "zero", "any"])
        pad = {"same": dil * (k - 1) // 2, "zero": 0}.get(pad_rule) or d.int(0, dil * (k - 1) // 2)
        groups, cout = 1, d.int(1, 12)
        inner = [g for g in _divisors(c) if 1 < g < c]
        if variant == "depthwise":
            groups, cout = c, c * d.pick([1, 1, 2])
        elif variant == "grouped" and inner:
            groups = d.pick(inner)
            cout = groups * d.int(1, 3)
        return op, {"cin": c, "cout": cout, "k": k, "stride": d.pick([1, 2]), "dilation": dil, "padding": pad,
                        "groups": groups, "bias": d.pick([True, False])}
    if op == "act":
        return op, {"fn": d.pick(ACTIVATIONS)}
    if op == "batchnorm":
        return op, {"c": c}
    if op == "groupnorm":
        return op, {"groups": d.pick(_divisors(c)), "c": c}
    if op == "layernorm":
        return op, {"d": w, "affine": d.pick([True, False])}
    if op in ("maxpool", "avgpool"):
        k = d.pick([2, 3])
        p = {"k": k, "stride": d.pick([1, 2]), "padding": d.int(0, k // 2), "ceil": d.pick([False, True])}
        if op == "avgpool":
            p["count_pad"] = d.pick([True, False])
        return op, p
    if op == "adaptive_avgpool":
        return op, {"oh": d.int(1, min(h, 5)), "ow": d.int(1, min(w, 5))}
    if op == "upsample":
        how = d.pick(["x2", "up", "down"])
        oh, ow = {"x2": (2 * h, 2 * w), "up": (h + d.int(1, 5), w + d.int(1, 5)),
                  "down": (max(1, h - d.int(1, 3)), max(1, w - d.int(1, 3)))}[how]
        return op, {"mode": d.pick(["nearest", "bilinear"]), "oh": oh, "ow": ow, "align": d.pick([False, True])}
    if op == "se":
        return op, {"c": c, "r": max(1, c // d.pick([2, 4])), "gate": d.pick(["sigmoid", "hardsigmoid"])}
    if op == "reshape":
        return op, {"shape": d.pick([(1, c, w, h), (1, 1, c * h, w), (1, c * h, w, 1)])}
    if op == "split":
        if c < 2:
            return "act", {"fn": "relu"}
        return op, {"first": d.int(1, c - 1), "total": c, "pick": d.int(0, 1)}
    return op, {}  # transpose_hw, image_to_seq, global_pool, flatten


def _draw_seq_op(d: Drawer, shape: tuple) -> tuple[str, dict]:
    _, length, dim = shape
    op = d.pick(["linear", "linear", "act", "layernorm", "softmax", "attention", "attention",
                 "self_matmul", "seq_to_image", "seq_mean"])
    if op == "linear":
        return op, {"din": dim, "dout": d.pick([4, 6, 8, 12, 16, d.int(1, 16)]), "bias": d.pick([True, False])}
    if op == "act":
        return op, {"fn": d.pick(ACTIVATIONS)}
    if op == "layernorm":
        return op, {"d": dim, "affine": d.pick([True, False])}
    if op == "attention":
        return op, {"d": dim, "heads": d.pick(_divisors(dim)), "impl": d.pick(["manual", "sdpa", "mha"])}
    if op == "self_matmul":
        return op, {"d": dim}
    if op == "seq_to_image":
        h = d.pick(_divisors(length))
        return op, {"d": dim, "h": h, "w": length // h}
    return op, {}  # softmax, seq_mean


def _draw_vec_op(d: Drawer, shape: tuple) -> tuple[str, dict]:
    op = d.pick(["linear", "linear", "act", "layernorm", "softmax"])
    if op == "linear":
        return op, {"din": shape[1], "dout": d.int(1, 16), "bias": d.pick([True, False])}
    if op == "act":
        return op, {"fn": d.pick(ACTIVATIONS)}
    if op == "layernorm":
        return op, {"d": shape[1], "affine": d.pick([True, False])}
    return op, {}


_DRAW = {"img": _draw_image_op, "seq": _draw_seq_op, "vec": _draw_vec_op}


def _try_node(op: str, params: dict, inputs: tuple, shapes: list[tuple]) -> Node | None:
    """The node with its output shape, or None where the op rejects these inputs or grows too big."""
    try:
        with torch.no_grad():
            out = OPS[op](**params).eval()(*[torch.zeros(shapes[i]) for i in inputs])
    except (RuntimeError, ValueError):
        return None
    if out.numel() == 0 or out.numel() > MAX_ELEMENTS or out.dim() not in (2, 3, 4):
        return None
    return Node(op, tuple(sorted(params.items())), inputs, tuple(out.shape))


def _draw_binary(d: Drawer, last: int, shapes: list[tuple]) -> Node | None:
    """add / mul with an earlier node of the same shape, or a concat where all but one dim agree."""
    s = shapes[last]
    same = [i for i in range(last) if shapes[i] == s]
    cat_dim = 1 if len(s) == 4 else len(s) - 1
    catable = [i for i in range(last) if len(shapes[i]) == len(s) and all(
        a == b for j, (a, b) in enumerate(zip(shapes[i], s)) if j != cat_dim)]
    options = ([("add", i) for i in same] + [("mul", i) for i in same] + [("concat", i) for i in catable])
    if not options:
        return None
    op, other = d.pick(options)
    params = {"dim": cat_dim} if op == "concat" else {}
    return _try_node(op, params, (last, other) if d.pick([True, False]) else (other, last), shapes)


def draw_spec(d: Drawer, *, max_nodes: int = 6, seed: int | None = None) -> ModelSpec:
    """A random valid model of 1..``max_nodes`` ops on a 1x{3..8}x{7..20}x{7..20} image or, one
    time in four, a 1x{4..32}x{4..16} token sequence (so attention gets short sequences)."""
    if d.int(0, 3):
        input_shape = (1, d.int(3, 8), d.int(7, 20), d.int(7, 20))
    else:
        input_shape = (1, d.int(4, 32), d.int(4, 16))
    seed = d.int(0, 2**16) if seed is None else seed
    nodes, shapes = [Node("input", shape=input_shape)], [input_shape]
    for _ in range(d.int(1, max_nodes)):
        last = len(nodes) - 1
        node = _draw_binary(d, last, shapes) if last > 0 and d.int(0, 3) == 0 else None
        if node is None:
            # mostly a chain; sometimes a branch from an earlier node (merged later by a binary op)
            src = last if d.int(0, 4) else d.int(0, last)
            for _attempt in range(4):
                op, params = _DRAW[_kind(shapes[src])](d, shapes[src])
                node = _try_node(op, params, (src,), shapes)
                if node is not None:
                    break
            node = node or Node("act", (("fn", "relu"),), (src,), shapes[src])
        nodes.append(node)
        shapes.append(node.shape)
    # the last node, and the latest other node nothing reads (an unmerged branch): a second output
    used = {j for n in nodes for j in n.inputs}
    sinks = [i for i in range(len(nodes) - 2, 0, -1) if i not in used]
    outputs = (len(nodes) - 1,) + tuple(sinks[:1])
    return ModelSpec(input_shape=input_shape, nodes=tuple(nodes), outputs=outputs, seed=seed)


def model_specs(max_nodes: int = 6):
    """The hypothesis strategy of :func:`draw_spec` models."""
    from hypothesis import strategies as st

    return st.composite(lambda draw: draw_spec(HypothesisDrawer(draw), max_nodes=max_nodes))()


# --------------------------------------------------------------------------- checking, minimising
@dataclasses.dataclass(frozen=True)
class Outcome:
    """``status`` is ``ok``, ``refused`` (typed UnsupportedOperatorError), ``mismatch`` or ``error``."""

    status: str
    max_rel_error: float | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def finding(self) -> bool:
        return self.status in ("mismatch", "error")

    @property
    def signature(self) -> str:
        """What two failures must share to be "the same failure" while minimising."""
        if self.status != "error":
            return self.status
        return self.status + ":" + re.sub(r"\d+", "N", self.error.split("\n")[0])[:120]


#: Denominator floor of the relative error: the one omnic's own output check uses (see
#: omnic.compile.check). A reduction that cancels by construction (the mean of a LayerNorm's output,
#: say) leaves float rounding noise on both sides; these models' activations are of order 1, so a
#: real miscompilation (wrong values of the activations' size) still shows far above the tolerance.
ERROR_FLOOR = SCALE_FLOOR


def floored_relative_error(actual: list, expected: list, floor: float = ERROR_FLOOR) -> float:
    """``omnic.engine.relative_error`` per output, with max |expected| floored at ``floor``."""
    import numpy as np

    from omnic import engine

    worst = 0.0
    for a, e in zip(actual, expected):
        err = engine.relative_error([a], [e])  # inf for a shape or NaN/inf disagreement
        finite = np.abs(np.asarray(e, dtype=np.float64))
        finite = finite[np.isfinite(finite)]
        scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0  # engine's denominator
        worst = max(worst, err if not np.isfinite(err) else err * scale / max(scale, floor))
    return worst


def check(spec: ModelSpec, *, tolerance: float = TOLERANCE_FP32) -> Outcome:
    """Compile ``spec`` on ``host`` (untuned) and compare with PyTorch on two inputs: the example
    it was compiled with and a second one (which catches values folded from the example)."""
    import omnic
    from omnic import engine
    from omnic.core.errors import describe

    model, t0 = build(spec), time.perf_counter()
    as_list = (lambda o: [t.detach().numpy() for t in (o if isinstance(o, tuple) else (o,))])
    try:
        dm = engine.compile(model, "host", example_input(spec), progress=False)
        errors = []
        for which in (0, 1):
            x = example_input(spec, which)
            with torch.no_grad():
                expected = model(x)
            errors.append(floored_relative_error(as_list(dm(x)), as_list(expected)))
    except omnic.UnsupportedOperatorError as exc:
        return Outcome("refused", error=describe(exc), seconds=time.perf_counter() - t0)
    except omnic.OutputMismatchError as exc:  # omnic's own check refused the build: a mismatch found
        return Outcome("mismatch", max_rel_error=exc.max_rel_error, error=describe(exc),
                       seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - any other failure is what the fuzzer is looking for
        return Outcome("error", error=describe(exc), seconds=time.perf_counter() - t0)
    worst = max(errors)
    status = "ok" if worst <= tolerance else "mismatch"
    return Outcome(status, max_rel_error=worst, seconds=time.perf_counter() - t0)


def _prune(spec: ModelSpec, outputs: tuple) -> ModelSpec:
    """Keep only the nodes ``outputs`` depend on, renumbered."""
    keep, stack = {0}, list(outputs)
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(spec.nodes[i].inputs)
    order = sorted(keep)
    new = {old: k for k, old in enumerate(order)}
    nodes = tuple(dataclasses.replace(spec.nodes[i], inputs=tuple(new[j] for j in spec.nodes[i].inputs))
                  for i in order)
    return dataclasses.replace(spec, nodes=nodes, outputs=tuple(new[o] for o in outputs))


def _bypass(spec: ModelSpec, i: int) -> ModelSpec | None:
    """``spec`` without node ``i``, its users reading an input of it of the same shape instead."""
    node = spec.nodes[i]
    same = [j for j in node.inputs if spec.nodes[j].shape == node.shape]
    if not same:
        return None
    rewire = (lambda j: same[0] if j == i else j)
    nodes = tuple(dataclasses.replace(n, inputs=tuple(rewire(j) for j in n.inputs)) for n in spec.nodes)
    return _prune(dataclasses.replace(spec, nodes=nodes), tuple(dict.fromkeys(rewire(o) for o in spec.outputs)))


def minimise(spec: ModelSpec, fails: Callable[[ModelSpec], bool] | None = None) -> ModelSpec:
    """The smallest spec found that still fails the way ``spec`` does.

    First the shortest prefix (one output, the earliest node where it already fails), then drops
    every node that can be bypassed. ``fails`` defaults to: :func:`check` gives the same signature.
    """
    if fails is None:
        signature = check(spec).signature
        fails = (lambda s: check(s).signature == signature)
    for k in range(1, len(spec.nodes)):
        candidate = _prune(spec, (k,))
        if candidate != spec and fails(candidate):
            spec = candidate
            break
    changed = True
    while changed:
        changed = False
        for i in range(len(spec.nodes) - 1, 0, -1):
            candidate = _bypass(spec, i)
            if candidate is not None and fails(candidate):
                spec, changed = candidate, True
                break
    return spec


def describe_spec(spec: ModelSpec) -> str:
    """One line per node: ``n3 = conv(n2; cin=3, ...) -> (1, 5, 9, 9)``."""
    lines = [f"n0 = input {spec.input_shape}"]
    for i, n in enumerate(spec.nodes[1:], 1):
        args = ", ".join(f"{k}={v}" for k, v in n.params)
        ins = ", ".join(f"n{j}" for j in n.inputs)
        lines.append(f"n{i} = {n.op}({ins}{'; ' + args if args else ''}) -> {n.shape}")
    lines.append("return " + ", ".join(f"n{o}" for o in spec.outputs))
    return "\n".join(lines)


def repro(spec: ModelSpec) -> str:
    """A self-contained script (run from the repository root) that reproduces ``spec``'s outcome."""
    return ("from tests.fuzz.generator import *\nfrom omnic import engine\n"
            f"spec = {spec!r}\n"
            "dm = engine.compile(build(spec), 'host', example_input(spec))\n"
            "print(dm.report['max_rel_error'])")
