"""Per-kernel latency (VM instrument hooks), FLOPs, parameters and activation memory."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any, Sequence

import torch

from omnic.ir import TracedModel


class Profile(dict):
    """A profile: a plain dict (for JSON) that prints as a table."""

    def table(self, top: int = 15) -> str:
        lines = [f"device {self['device']} ({self['precision']}): latency {self['latency_ms']:.3f} ms "
                 f"(spread {100 * self['latency_spread']:.1f}%)",
                 f"FLOPs {_si(self['flops'])}  params {_si(self['params'])} "
                 f"({_bytes(self['param_bytes'])})  peak activations {_bytes(self['peak_activation_bytes'])}",
                 f"kernels: {len(self['kernels'])} distinct, {sum(k['calls'] for k in self['kernels'])} calls",
                 f"{'kernel':<52} {'calls':>5} {'ms':>9} {'share':>6}"]
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
    """FLOPs of one forward pass (multiply-add = 2), counted by torch's FlopCounterMode."""
    if traced.gm is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        traced.gm(*traced.example_inputs)
    return int(counter.get_total_flops())


def parameter_stats(traced: TracedModel) -> tuple[int | None, int | None]:
    """(number of parameters, bytes of parameters and buffers)."""
    if traced.gm is None:
        import onnx
        import numpy as np

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


def kernel_times(vm, dev, inputs: Sequence[Any], *, runs: int = 10) -> list[dict[str, Any]]:
    """Per-kernel wall time from the VM's instrument hook, median over ``runs`` runs.

    The hook adds a small cost per call and wakes the thread pool between kernels, so read the
    numbers as shares of the total rather than exact kernel times.
    """
    samples: dict[str, list[float]] = defaultdict(list)
    per_run: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    starts: dict[str, float] = {}

    def hook(func, name, before, ret, *args):
        key = str(name)
        if before:
            starts[key] = time.perf_counter()
        else:
            per_run[key] += (time.perf_counter() - starts.pop(key, time.perf_counter())) * 1e3
            calls[key] += 1
        return 0

    vm.set_instrument(hook)
    try:
        vm["main"](*inputs)  # warm-up
        calls.clear()
        per_run.clear()
        for _ in range(runs):
            per_run.clear()
            vm["main"](*inputs)
            for key, ms in per_run.items():
                samples[key].append(ms)
    finally:
        vm.set_instrument(lambda *a: 0)
    rows = []
    for key, values in samples.items():
        if key.startswith("vm.builtin."):
            kind = "builtin"
        else:
            kind = "kernel"
        rows.append({"name": key, "kind": kind, "calls": calls[key] // runs,
                     "total_ms": float(statistics.median(values))})
    total = sum(r["total_ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["total_ms"] / total
    rows.sort(key=lambda r: -r["total_ms"])
    return rows
