"""Like-with-like latency measurement of omnic, PyTorch eager and ONNX Runtime in one process.

Every framework runs batch 1 with the same thread count; each number is the median per-call
wall time as a user calls it from Python (numpy/torch in, outputs out). For omnic, TVM's native
timer is reported beside it so the Python overhead is visible.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from omnic.baselines import onnxruntime_session, per_call_ms, torch_eager_ms  # noqa: F401


def onnxruntime_ms(model: torch.nn.Module, x: torch.Tensor, threads: int) -> tuple[float, np.ndarray]:
    sess = onnxruntime_session(model, x, threads)
    feed = {"x": x.numpy()}
    return per_call_ms(lambda: sess.run(None, feed)), sess.run(None, feed)[0]


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
