"""Like-with-like latency measurement of omnic, PyTorch eager and ONNX Runtime in one process.

Every framework runs batch 1 with the same thread count; each number is the median per-call
wall time as a user calls it from Python (numpy/torch in, outputs out). For omnic, TVM's native
timer is reported beside it so the Python overhead is visible.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from omnic.baselines import onnxruntime_session, per_call_ms, torch_eager_ms  # noqa: F401


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
    ort_err = float(np.abs(sess.run(None, feed)[0] - ref).max() / np.abs(ref).max())
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
