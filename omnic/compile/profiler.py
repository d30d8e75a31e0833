"""Per-kernel latency (VM instrument hooks), FLOPs, parameters and activation memory."""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode

from omnic.core.ir import TracedModel


class Profile(dict):
    """A profile: a plain dict (for JSON) that prints as a table."""

    def table(self, top: int = 15) -> str:
        lines = [f"device {self['device']} ({self['precision']}): latency {self['latency_ms']:.3f} ms "
                 f"(spread {100 * self['latency_spread']:.1f}%)",
                 f"FLOPs {_si(self['flops'])}  params {_si(self['params'])} "
                 f"({_bytes(self['param_bytes'])})  peak activations {_bytes(self['peak_activation_bytes'])}",
                 f"kernels: {len(self['kernels'])} distinct, {sum(k['calls'] for k in self['kernels'])} calls",
                 f"{'kernel (fastest of its runs)':<52} {'calls':>5} {'ms':>9} {'share':>6}"]
        for k in self["kernels"][:top]:
            lines.append(f"{k['name'][:52]:<52} {k['calls']:>5} {k['total_ms']:>9.4f} {100 * k['share']:>5.1f}%")
        if len(self["kernels"]) > top:
            rest = sum(k["total_ms"] for k in self["kernels"][top:])
            lines.append(f"{'... ' + str(len(self['kernels']) - top) + ' more':<52} {'':>5} {rest:>9.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _si(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def count_flops(traced: TracedModel) -> int | None:
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode; for ONNX
    files, from the graph's Conv, Gemm and MatMul nodes (see :func:`onnx_flops`)."""
    if traced.gm is None:
        return onnx_flops(traced.onnx_path, traced.input_shapes, traced.input_names) if traced.onnx_path else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        traced.gm(*traced.example_inputs)
    return int(counter.get_total_flops())


def onnx_flops(path: str, input_shapes: Sequence[Sequence[int]], input_names: Sequence[str]) -> int | None:
    """FLOPs of an ONNX model's Conv, ConvTranspose, Gemm and MatMul nodes (multiply-add = 2),
    with tensor shapes from ``onnx.shape_inference`` at the given input shapes.

    These are the ops torch's FlopCounterMode counts for the equivalent PyTorch model (biases and
    elementwise ops are not counted by either), so both sources of a model give the same figure.
    Returns None where a counted node's shapes cannot be inferred (a number that leaves out a
    matmul would be a wrong answer).
    """
    model = onnx.load(path)
    given = dict(zip(input_names, input_shapes))
    for gi in model.graph.input:  # pin dynamic dims to the example inputs', as lowering does
        if gi.name in given:
            dims = gi.type.tensor_type.shape.dim
            for d, v in zip(dims, given[gi.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an exotic graph: no FLOPs rather than no profile
        return None
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        ins = [shapes.get(n) for n in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(x is None for x in ins) or out is None:
            return None
        if node.op_type == "Conv":  # each output element: (C / groups) * prod(kernel) MACs
            total += 2 * int(np.prod(out)) * int(np.prod(ins[1][1:]))
        elif node.op_type == "ConvTranspose":  # each input element scatters into (M / groups) * prod(kernel)
            total += 2 * int(np.prod(ins[0])) * int(np.prod(ins[1][1:]))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            k = ins[0][0] if trans_a else ins[0][-1]
            total += 2 * int(np.prod(out)) * int(k)
        else:  # MatMul: out (..., M, N), each element K MACs
            total += 2 * int(np.prod(out)) * int(ins[0][-1])
    return total


def parameter_stats(traced: TracedModel) -> tuple[int | None, int | None]:
    """(number of parameters, bytes of parameters and buffers)."""
    if traced.gm is None:
        model = onnx.load(traced.onnx_path)
        n = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
        return n, n * 4
    params = sum(p.numel() for p in traced.gm.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in traced.gm.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in traced.gm.buffers())
    return int(params), int(nbytes)


def peak_activation_bytes(traced: TracedModel) -> int | None:
    """Peak bytes of live activations over the fx graph's execution order (no in-place reuse)."""
    if traced.gm is None:
        return None
    nodes = list(traced.gm.graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for inp in node.all_input_nodes:
            last_use[inp] = i

    def size(node) -> int:
        meta = node.meta.get("tensor_meta")
        # TensorMetadata is itself a NamedTuple: only a tuple *without* .shape is a multi-output
        metas = [meta] if hasattr(meta, "shape") or meta is None else list(meta)
        total = 0
        for m in metas:
            if m is not None and hasattr(m, "shape"):
                n = 1
                for d in m.shape:
                    n *= int(d)
                total += n * torch.empty((), dtype=m.dtype).element_size()
        return total

    live, peak = 0, 0
    alive: dict[Any, int] = {}
    for i, node in enumerate(nodes):
        if node.op in ("get_attr", "output"):
            continue
        s = size(node)
        alive[node] = s
        live += s
        peak = max(peak, live)
        for inp in list(alive):
            if last_use.get(inp, -1) <= i and inp is not node:
                live -= alive.pop(inp)
    return int(peak)


def instrumented_runs(vm, inputs: Sequence[Any], *, runs: int) -> list[list[tuple[str, float]]]:
    """Every call the VM makes in ``runs`` runs of ``main``: per run, ``(name, ms)`` in call order.

    Timed by the VM's instrument hook (one warm-up run first). The hook itself costs a few
    microseconds per call, which :func:`call_sites` estimates and removes.
    """
    current: list[tuple[str, float]] = []
    starts: dict[str, float] = {}
    clock = time.perf_counter

    def hook(func, name, before, ret, *args):
        key = str(name)
        if before:
            starts[key] = clock()
        else:
            current.append((key, (clock() - starts.pop(key, clock())) * 1e3))
        return 0

    recorded: list[list[tuple[str, float]]] = []
    vm.set_instrument(hook)
    try:
        vm["main"](*inputs)  # warm-up
        for _ in range(runs):
            current.clear()
            vm["main"](*inputs)
            recorded.append(list(current))
    finally:
        # None removes the hook; a do-nothing Python hook would still cost microseconds on
        # every later call of this VM
        vm.set_instrument(None)
    return recorded


def call_sites(vm, inputs: Sequence[Any], *, runs: int = 10, sessions: int = 2,
               pause_s: float = 1.0) -> list[dict[str, Any]]:
    """Each call of one run of ``main``, in order, with its fastest and median time over all runs.

    The runs are split into ``sessions`` separated by ``pause_s``: a shared machine has slow
    phases lasting seconds, and contention only ever adds time, so each call's fastest run is
    the estimate of its own cost; a single burst of runs can sit entirely in a slow phase.
    The hook's own cost per call (the cheapest call of a VM builtin, which does no work) is
    subtracted from every call.

    Returns:
        ``[{"index", "name", "kind" ("kernel" | "builtin"), "fastest_ms", "median_ms"}]``.
    """
    recorded: list[list[tuple[str, float]]] = []
    for s in range(max(1, sessions)):
        if s:
            time.sleep(pause_s)
        recorded += instrumented_runs(vm, inputs, runs=max(1, runs // max(1, sessions)))
    names = [name for name, _ in recorded[0]]
    assert all([n for n, _ in r] == names for r in recorded), "main's call sequence changed between runs"
    per_site = [[r[i][1] for r in recorded] for i in range(len(names))]
    builtin = [min(v) for n, v in zip(names, per_site) if n.startswith("vm.builtin.")]
    hook_ms = min(builtin) if builtin else 0.0
    return [{"index": i, "name": n, "kind": "builtin" if n.startswith("vm.builtin.") else "kernel",
             "fastest_ms": max(0.0, min(v) - hook_ms), "median_ms": max(0.0, statistics.median(v) - hook_ms)}
            for i, (n, v) in enumerate(zip(names, per_site))]


def kernel_times(vm, dev, inputs: Sequence[Any], *, runs: int = 10, sessions: int = 2,
                 pause_s: float = 1.0) -> list[dict[str, Any]]:
    """Per-kernel time inside the model: :func:`call_sites` summed per function (see
    :func:`kernels_from_sites`)."""
    return kernels_from_sites(call_sites(vm, inputs, runs=runs, sessions=sessions, pause_s=pause_s))


def kernels_from_sites(sites: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each function the VM calls, summed over its calls.

    ``total_ms`` adds up each call's fastest time (see :func:`call_sites` for why the fastest);
    ``median_ms`` adds up the medians. ``share`` is the kernel's part of the sum of
    ``total_ms``; ``first_call`` its position in the call order. Sorted by ``total_ms``, largest
    first.
    """
    rows: dict[str, dict[str, Any]] = {}
    for site in sites:
        row = rows.setdefault(site["name"], {"name": site["name"], "kind": site["kind"], "calls": 0,
                                             "total_ms": 0.0, "median_ms": 0.0, "first_call": site["index"]})
        row["calls"] += 1
        row["total_ms"] += site["fastest_ms"]
        row["median_ms"] += site["median_ms"]
    total = sum(r["total_ms"] for r in rows.values()) or 1.0
    for r in rows.values():
        r["share"] = r["total_ms"] / total
    return sorted(rows.values(), key=lambda r: -r["total_ms"])
