"""Like-with-like latency measurement of omnic, PyTorch eager and ONNX Runtime in one process.

Every framework runs batch 1 with the same thread count; each number is the median per-call
wall time as a user calls it from Python (numpy/torch in, outputs out). For omnic, TVM's native
timer is reported beside it so the Python overhead is visible.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from omnic.examples.baselines import onnxruntime_session, per_call_ms, torch_eager_ms  # noqa: F401
from omnic.engine import relative_error


def onnxruntime_ms(model: torch.nn.Module, x: torch.Tensor, threads: int) -> tuple[float, np.ndarray]:
    sess = onnxruntime_session(model, x, threads)
    feed = {"x": x.numpy()}
    return per_call_ms(lambda: sess.run(None, feed)), sess.run(None, feed)[0]


def native_ms(device_model: Any, *, min_time_s: float = 1.0, min_calls: int = 10) -> float:
    """TVM's own timer on the same terms as :func:`per_call_ms`: the median of single runs over a
    window. Not the oracle's protocol, whose repeats are each the fastest of a few runs: that sits
    below a median of single calls, and the gap to the per-call column would stop being only the
    Python overhead."""
    runtime = device_model.runtime  # local or RPC: both expose the VM, its device and uploads
    runtime.vm.set_input("main", *[runtime.to_device(a) for a in device_model.random_inputs()])
    warm = runtime.vm.time_evaluator("invoke_stateful", runtime.dev, number=1, repeat=3)("main")
    calls = max(min_calls, int(min_time_s / max(1e-6, min(warm.results))))
    res = runtime.vm.time_evaluator("invoke_stateful", runtime.dev, number=1, repeat=calls)("main")
    return float(statistics.median(res.results)) * 1e3


def omnic_ms(device_model: Any, x: torch.Tensor) -> tuple[float, float]:
    """(per-call wall time from Python with torch in/out, TVM native timer median)."""
    return per_call_ms(lambda: device_model(x)), native_ms(device_model)


def machine_line() -> str:
    import platform

    load = os.getloadavg()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # "AMD EPYC" names Zen 3, 4 and 5 alike, and this VM kind is any of them from run to run
        from omnic.compile.target import host_cpu_name

        cpu += f" ({host_cpu_name()})"
    except Exception:  # noqa: BLE001 - the line is informative only
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}, "
            f"load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def side_by_side(model: torch.nn.Module, x: torch.Tensor, device_model: Any, *, threads: int, rounds: int = 15,
                 min_time_s: float = 0.4, pause_s: float = 0.2, label: str = "") -> dict[str, Any]:
    """PyTorch eager, ONNX Runtime and omnic on one input, in ``rounds`` interleaved rounds.

    A 2-core VM changes speed by a third within minutes (ONNX Runtime's ResNet-18 ran 13.3 ms in
    one round and 19.7 ms a minute later, same process), so rounds are short and many, and the
    ratio of two frameworks is also taken *within* each round (both saw the same machine) and
    then the median over rounds is reported (``ratio_rounds_omnic_ort``). Each framework pauses
    briefly before its turn so that none runs in another's scheduler wake. Returns the per-round
    samples, their medians, the run-to-run spread of each framework ((max - min) / median over
    the rounds) and the ratios.
    """
    torch.set_num_threads(threads)
    sess = onnxruntime_session(model, x, threads)
    feed = {"x": x.numpy()}
    with torch.inference_mode():
        ref = model(x).numpy()
    ort_err = relative_error([sess.run(None, feed)[0]], [ref])  # the same measure as omnic's own check
    samples: dict[str, list[float]] = {"omnic": [], "omnic_native": [], "ort": [], "torch": []}
    for r in range(rounds):
        with torch.inference_mode():
            samples["torch"].append(per_call_ms(lambda: model(x), min_time_s=min_time_s))
        time.sleep(pause_s)
        samples["ort"].append(per_call_ms(lambda: sess.run(None, feed), min_time_s=min_time_s))
        time.sleep(pause_s)
        samples["omnic"].append(per_call_ms(lambda: device_model(x), min_time_s=min_time_s))
        samples["omnic_native"].append(native_ms(device_model, min_time_s=min_time_s))
        time.sleep(pause_s)
        print(f"[{label}] round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f} ms" for k, v in samples.items()),
              flush=True)
    med = {k: float(statistics.median(v)) for k, v in samples.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in samples.items()}
    per_round = [a / b for a, b in zip(samples["omnic"], samples["ort"])]
    per_round_native = [a / b for a, b in zip(samples["omnic_native"], samples["ort"])]
    return {"median_ms": med, "rounds_ms": samples, "spread": spread, "ort_rel_error": ort_err,
            "ratio_omnic_ort": med["omnic"] / med["ort"], "ratio_native_ort": med["omnic_native"] / med["ort"],
            "ratio_omnic_torch": med["omnic"] / med["torch"],
            "ratio_rounds_omnic_ort": float(statistics.median(per_round)),
            "ratio_rounds_native_ort": float(statistics.median(per_round_native)),
            "ratio_rounds_range": [float(min(per_round)), float(max(per_round))]}


def ort_node_times(model: torch.nn.Module, x: torch.Tensor, threads: int, *, runs: int = 30, sessions: int = 3,
                   pause_s: float = 1.0) -> list[dict[str, Any]]:
    """ONNX Runtime's per-node times (its own profiler), in execution order, like
    :func:`omnic.compile.profiler.call_sites`: each node's fastest and median over ``runs`` runs split
    into ``sessions`` separated by ``pause_s``.

    Returns:
        ``[{"index", "name", "op", "weight_elements", "fastest_ms", "median_ms"}]``.
    """
    import json
    import tempfile

    from omnic.examples.baselines import onnxruntime_session

    with tempfile.TemporaryDirectory() as tmp:
        sess = onnxruntime_session(model, x, threads, profile_prefix=os.path.join(tmp, "ort"))
        feed = {"x": x.numpy()}
        warmup = 3
        for _ in range(warmup):
            sess.run(None, feed)
        per_session = max(1, runs // max(1, sessions))
        for s in range(max(1, sessions)):
            if s:
                time.sleep(pause_s)
            for _ in range(per_session):
                sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total_runs = warmup + per_session * max(1, sessions)
    assert nodes and len(nodes) % total_runs == 0, (len(nodes), total_runs)
    width = len(nodes) // total_runs
    timed = [nodes[r * width:(r + 1) * width] for r in range(warmup, total_runs)]
    rows = []
    for i, first in enumerate(timed[0]):
        values = [run[i]["dur"] / 1e3 for run in timed]
        shapes = first["args"].get("input_type_shape") or []
        weight = [int(np.prod(next(iter(d.values())))) for d in shapes[1:2]]  # a conv's second input
        rows.append({"index": i, "name": first["name"][: -len("_kernel_time")], "op": first["args"].get("op_name", ""),
                     "weight_elements": weight[0] if weight else 0,
                     "fastest_ms": min(values), "median_ms": statistics.median(values)})
    return rows


def weight_sizes_in_call_order(module: Any) -> list[tuple[str, int]]:
    """``(kernel, elements of its largest constant argument)`` for each ``call_tir`` of ``main``
    of a built omnic module, in binding order: the weight of a conv kernel (0: no constant)."""
    import tvm
    from tvm import relax

    from omnic.compile import winograd

    def constant(expr: Any) -> bool:
        if isinstance(expr, tvm.ir.expr.Constant):
            return True
        if isinstance(expr, relax.Tuple):
            return all(constant(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return constant(expr.tuple_value)
        return isinstance(expr, relax.Var) and expr in const_vars

    const_vars: set[Any] = set()
    calls: list[tuple[str, int]] = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if constant(value):
                const_vars.add(binding.var)
            elif isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) \
                    and value.op.name == "relax.call_tir":
                sizes = [int(np.prod([int(d) for d in a.ty.shape])) for a in value.args[1].fields
                         if constant(a)]
                name, size = value.args[0].name_hint, max(sizes, default=0)
                if "winograd" in name and size:
                    # the transformed weight has (m+2)^2 taps per channel pair, the conv's 9
                    _, out_h, out_w, _ = (int(d) for d in value.ty.shape)
                    size = size * 9 // (winograd.tile_size(out_h, out_w) + 2) ** 2
                calls.append((name, size))
    return calls


def conv_by_conv(omnic_sites: list[dict[str, Any]], ort_nodes: list[dict[str, Any]],
                 weights: list[tuple[str, int]], *, window: int = 4, max_ratio: float = 1.5) -> dict[str, Any]:
    """Pair each ONNX Runtime conv node with omnic's kernel of the same conv, to say which convs
    cost omnic the time it loses.

    The two run a residual block's convs in slightly different orders, and either may pad a
    weight's channels for its layout (ORT's NCHWc blocks of 16 report a 24-channel weight as 32),
    so a node is paired with the first of the next ``window`` unpaired omnic convs in call order
    whose weight size is within a factor of ``max_ratio`` of its own.

    Args:
        omnic_sites: :func:`omnic.compile.profiler.call_sites` of the omnic build.
        ort_nodes: :func:`ort_node_times` of the same model.
        weights: :func:`weight_sizes_in_call_order` of the omnic build's module.

    Returns:
        ``{"pairs": [...], "omnic_conv_ms", "ort_conv_ms", "omnic_rest_ms", "ort_rest_ms",
        "unpaired_ort": [...]}`` (the rest: every call that is not a paired conv).
    """
    free, bindings = [], iter(weights)
    for site in (s for s in omnic_sites if s["kind"] == "kernel"):
        # (a call_tir the VM runs as a builtin, e.g. a reshape, has no kernel call: skip it)
        weight = next((w for name, w in bindings if name == site["name"]), None)
        assert weight is not None, f"{site['name']} is not a call_tir binding of main"
        if "conv2d" in site["name"] and weight:
            free.append((site, weight))
    pairs, unpaired = [], []
    for node in (n for n in ort_nodes if n["op"] in ("Conv", "FusedConv")):
        w = node.get("weight_elements") or 0
        hit = next((i for i, (_, ow) in enumerate(free[:window])
                    if w and abs(math.log(ow / w)) <= math.log(max_ratio)), None)
        if hit is None:
            unpaired.append(node["name"])
            continue
        site, ow = free.pop(hit)
        pairs.append({"omnic": site["name"], "ort": node["name"], "weight_elements": ow,
                      "ort_weight_elements": w, "omnic_ms": site["fastest_ms"], "ort_ms": node["fastest_ms"],
                      "ratio": site["fastest_ms"] / node["fastest_ms"] if node["fastest_ms"] else None})
    omnic_conv = sum(p["omnic_ms"] for p in pairs)
    ort_conv = sum(p["ort_ms"] for p in pairs)
    return {"pairs": pairs, "omnic_conv_ms": omnic_conv, "ort_conv_ms": ort_conv,
            "omnic_rest_ms": sum(s["fastest_ms"] for s in omnic_sites) - omnic_conv,
            "ort_rest_ms": sum(n["fastest_ms"] for n in ort_nodes) - ort_conv, "unpaired_ort": unpaired}
