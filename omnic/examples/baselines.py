"""What users compare omnic with: PyTorch eager and ONNX Runtime, timed like-with-like.

Batch as given, the same thread count for every framework, per-call wall time as a user calls
it from Python (tensors or arrays in, outputs out), median after warm-up.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable

import torch


def per_call_ms(fn: Callable[[], Any], *, min_time_s: float = 1.0, min_calls: int = 10, warmup: int = 3) -> float:
    """Median of per-call wall times over at least ``min_time_s`` and ``min_calls`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def onnxruntime_session(model: torch.nn.Module, x: torch.Tensor, threads: int, *, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session for ``model`` (exported with opset 17, input named ``x``).

    With ``profile_prefix``, the session records every node's time (ONNX Runtime's profiler;
    ``session.end_profiling()`` writes the JSON trace and returns its path).
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def torch_eager_ms(model: torch.nn.Module, x: torch.Tensor, threads: int, **kwargs: Any) -> float:
    """Per-call latency of ``model(x)`` under ``torch.inference_mode`` with ``threads`` threads."""
    torch.set_num_threads(threads)
    model = model.eval()
    with torch.inference_mode():
        return per_call_ms(lambda: model(x), **kwargs)


def onnxruntime_ms(model: torch.nn.Module, x: torch.Tensor, threads: int, **kwargs: Any) -> float:
    """Per-call latency of the ONNX Runtime session with a numpy input."""
    sess = onnxruntime_session(model, x, threads)
    feed = {"x": x.numpy()}
    return per_call_ms(lambda: sess.run(None, feed), **kwargs)
