"""Where a wrong build parts from PyTorch: binary search over prefixes of the fx graph.

Runs only on the error path (a compiled program whose outputs differ from PyTorch's), so its cost
(a handful of untuned builds of graph prefixes) does not matter much. No TVM here: building and
running a prefix is the caller's ``run_prefix`` (``engine.compile`` wires its own compiler in), and
the rest is torch.fx and numpy, so the search is testable with a fake compiler.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from omnic.compile.check import relative_error
from omnic.core.errors import OutputMismatchError
from omnic.core.ir import TracedModel, trace

#: ``run_prefix(prefix)``: build the traced prefix the way the failing build was built, run it on
#: ``prefix.example_inputs`` and return its outputs as numpy arrays.
RunPrefix = Callable[[TracedModel], Sequence[np.ndarray]]

#: Modules and functions whose lowering to TVM has produced wrong programs before; named when
#: bisection cannot run, as the first places to look.
SUSPECT_OPS = frozenset({"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "grid_sample", "affine_grid",
                         "select", "index_select", "gather", "take", "roll", "flip"})


@dataclass(frozen=True, kw_only=True)
class Mismatch:
    """The first fx node whose compiled output disagrees with PyTorch's.

    Attributes:
        node: The fx node's name.
        op: Its operator (module type, function or ``Tensor.method`` name).
        module: Its module path (``"<top level>"`` for functions called in ``forward``).
        max_rel_error: The prefix's output difference to PyTorch, relative to its largest value.
        last_good: The latest earlier node whose prefix still agreed (None if none was built).
        builds: Prefix builds the search took.
    """

    node: str
    op: str
    module: str
    max_rel_error: float
    last_good: str | None
    builds: int


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A readable name for what ``node`` computes."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def module_path(node: fx.Node) -> str:
    """The module ``node`` belongs to: its own path for a module call, else the innermost module
    the tracer recorded (fx's symbolic trace records none: then ``"<top level>"``)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "<top level>"


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps every node's value: PyTorch's intermediate outputs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _is_cut_point(node: fx.Node, value: Any) -> bool:
    """A node worth cutting after: it computes one non-empty floating-point tensor (tuples, ints
    and shapes cannot be a compiled program's only output)."""
    return (node.op in ("call_module", "call_function", "call_method") and isinstance(value, torch.Tensor)
            and value.is_floating_point() and value.numel() > 0)


def prefix(traced: TracedModel, node: fx.Node) -> TracedModel:
    """The graph up to ``node``, returning ``node``'s value, traced on the same example inputs."""
    gm = traced.gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n is node:
            break
    graph.output(env[node])
    cut = fx.GraphModule(gm, graph, type(gm).__name__)
    cut.graph.eliminate_dead_code()  # branches the cut does not need (placeholders stay)
    cut.recompile()
    return trace(cut, traced.example_inputs)


def first_mismatch(traced: TracedModel, run_prefix: RunPrefix, *, tolerance: float) -> Mismatch | None:
    """The first node whose compiled prefix disagrees with PyTorch beyond ``tolerance``.

    Assumes a wrong value stays wrong downstream (true of miscompiles in practice; a node that
    hides it, like an argmax, only makes the search blame an earlier node). A prefix that fails
    to build is left out of the search.

    Returns:
        The :class:`Mismatch`, or None when the graph cannot be cut (no fx graph) or the full
        graph's prefix does not reproduce the difference (the fault is in what only the whole
        build does, e.g. a tuned schedule or a fusion across the cut).
    """
    if traced.gm is None:
        return None
    recorder = _Recorder(traced.gm)
    with torch.no_grad():
        recorder.run(*traced.example_inputs)
    cands = [n for n in traced.gm.graph.nodes if _is_cut_point(n, recorder.values.get(n))]
    builds = 0
    errors: dict[int, float] = {}

    def bad(i: int) -> bool | None:
        nonlocal builds
        builds += 1
        try:
            actual = list(run_prefix(prefix(traced, cands[i])))
        except Exception:  # noqa: BLE001 - a prefix that does not build says nothing either way
            return None
        errors[id(cands[i])] = relative_error(actual, [recorder.values[cands[i]].numpy()])
        return errors[id(cands[i])] > tolerance

    while cands and bad(len(cands) - 1) is None:
        cands.pop()
    if not cands or not errors.get(id(cands[-1]), 0.0) > tolerance:
        return None
    lo, hi = 0, len(cands) - 1  # cands[hi] is bad; every candidate before lo agreed
    while lo < hi:
        mid = (lo + hi) // 2
        verdict = bad(mid)
        if verdict is None:
            cands.pop(mid)
            hi -= 1
        elif verdict:
            hi = mid
        else:
            lo = mid + 1
    node = cands[hi]
    return Mismatch(node=node.name, op=op_name(traced.gm, node), module=module_path(node),
                    max_rel_error=errors[id(node)], last_good=cands[hi - 1].name if hi > 0 else None,
                    builds=builds)


def suspect_ops(traced: TracedModel) -> list[str]:
    """Ops in the model whose lowering is a known risk (recurrent cells, grid sampling, indexing
    with negative indices), named when bisection cannot localise a mismatch."""
    if traced.gm is None:
        return []
    found: list[str] = []
    for node in traced.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        name = op_name(traced.gm, node)
        negative_index = node.target is operator.getitem and any(
            isinstance(i, int) and i < 0 for i in (node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)))
        if name in SUSPECT_OPS or negative_index:
            found.append(f"{name} ({node.name} in {module_path(node)!r}"
                         + (", negative index" if negative_index else "") + ")")
    return found


def mismatch_error(traced: TracedModel, max_rel_error: float, *, tolerance: float, precision: str, device: str,
                   run_prefix: RunPrefix | None) -> OutputMismatchError:
    """The error for a build whose outputs differ from PyTorch's: localised by :func:`first_mismatch`
    where ``run_prefix`` is given and the prefixes reproduce it, else naming the suspect ops."""
    found, why_not = None, "no prefix builder was given"
    if traced.gm is None:
        why_not = "an ONNX model has no fx graph to cut"
    elif run_prefix is not None:
        found = first_mismatch(traced, run_prefix, tolerance=tolerance)
        why_not = "the graph's prefixes, built alone, match PyTorch (the fault is in the whole build only)"
    head = (f"the compiled program's outputs differ from PyTorch on {device} beyond the {precision} tolerance "
            f"(max rel error {max_rel_error:.4g} > {tolerance:g})")
    if found is not None:
        where = (f": they part at fx node {found.node!r} ({found.op} in module {found.module!r}"
                 + (f"; outputs still agree after {found.last_good!r}" if found.last_good else "") + ")")
    else:
        suspects = suspect_ops(traced)
        where = (f"; could not localise it ({why_not})"
                 + (f"; ops whose lowering is suspect: {', '.join(suspects[:8])}" if suspects else ""))
    fix = ("\n  this is a compiler bug, not your model's: report it with the model; meanwhile replace that op "
           "with an equivalent one, or pass check=False (compile, get_latency, profile; `--no-check` on the "
           "command line) to use the build anyway, unchecked")
    return OutputMismatchError(head + where + fix, max_rel_error=max_rel_error, tolerance=tolerance,
                               node=found.node if found else None, op=found.op if found else None,
                               module=found.module if found else None)
