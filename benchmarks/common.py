"""Like-with-like latency measurement of omnic, PyTorch eager and ONNX Runtime in one process.

Every framework runs batch 1 with the same thread count; each number is the median per-call
wall time as a user calls it from Python (numpy/torch in, outputs out). For omnic, TVM's native
timer is reported beside it so the Python overhead is visible.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch


def per_call_ms(fn: Callable[[], Any], *, min_time_s: float = 1.0, min_calls: int = 10, warmup: int = 3) -> float:
    """Median of per-call wall times over at least ``min_time_s`` (after warm-up)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def torch_eager_ms(model: torch.nn.Module, x: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        return per_call_ms(lambda: model(x))


def onnxruntime_ms(model: torch.nn.Module, x: torch.Tensor, threads: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    out = sess.run(None, feed)[0]
    return per_call_ms(lambda: sess.run(None, feed)), out


def omnic_ms(device_model: Any, x: torch.Tensor) -> tuple[float, float]:
    """(per-call wall time from Python with torch in/out, TVM native timer median)."""
    per_call = per_call_ms(lambda: device_model(x))
    native = device_model.measure().median_ms
    return per_call, native


def machine_line() -> str:
    import platform

    load = os.getloadavg()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}, "
            f"load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
