"""Is a compiled program right? Its outputs against PyTorch's, within the precision's tolerance.

The measure is ``max|actual - expected| / max|expected|`` over all outputs: relative to the
output's scale, and ``inf`` for a shape mismatch or a NaN/inf where the reference is finite. The
check floors the scale at :data:`SCALE_FLOOR`: an output that is mathematically zero (the mean of
a normalised tensor, a difference of equal branches) comes out as float32 cancellation noise on
both sides, up to about ``n * 6e-8`` for a sum of ``n`` terms of order one, and noise divided by
noise is not an error. With the floor, such outputs may differ by ``1e-6`` (fp32) in absolute
terms; a wrong program is off by the order of its outputs, which the floor does not hide unless
every output is far below ``1e-2``. The tolerances (:data:`TOLERANCES`), and why:

- ``fp32``: ``1e-4``. Same arithmetic as PyTorch up to reassociation (tiling, vectorised sums,
  fused multiply-adds): a few ulps per op, well below ``1e-5`` for the networks omnic builds.
  A wrong program (an out-of-bounds read, a wrong op) is off by O(1).
- ``fp16``: ``1e-2``. Half precision carries 11 significant bits (unit round-off ``4.9e-4``);
  relative to the largest output, rounding in a few dozen layers stays a few ``1e-3``.
- ``int8``: ``0.1`` against the *fp32* PyTorch model (there is no PyTorch reference of omnic's
  own quantization scheme; for an ONNX QDQ model the reference is ONNX Runtime running the same
  quantized model). With scales from calibration (default: the example inputs themselves) each
  quantized layer adds at most half a step, ``1/254`` of its input range, per operand; a deep
  network accumulates a few percent. ``0.1`` leaves room for that and still refuses a wrong
  program, whose error is of the order of the output itself. A calibration set far from the
  example inputs (clipped activations) can exceed it: then the message's ``check=False`` applies,
  and ``QuantReport.accuracy`` says how far the build is from fp32 on the calibration samples.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from omnic.core.ir import TracedModel

#: Largest accepted ``max|a - e| / max|e|`` per precision (see the module docstring for why).
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1}

#: The output scale the check divides by is at least this (see the module docstring).
SCALE_FLOOR = 1e-2


def tolerance(precision: str) -> float:
    """The accepted relative output error for ``precision`` (``fp32``'s for an unknown one)."""
    return TOLERANCES.get(precision, TOLERANCES["fp32"])


def reference_outputs(traced: TracedModel) -> list[np.ndarray]:
    """PyTorch's (or ONNX Runtime's, for ONNX files) outputs on the example inputs."""
    if traced.gm is not None:
        with torch.no_grad():
            out = traced.gm(*traced.example_inputs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]
    import onnxruntime as ort  # lazy: only ONNX models need it, and it takes a second to import

    sess = ort.InferenceSession(traced.onnx_path, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(traced.input_names, traced.example_inputs)}
    return list(sess.run(None, feeds))


def relative_error(actual: list[np.ndarray], expected: list[np.ndarray], *, floor: float = 0.0) -> float:
    """max |a - e| / max(max |e|, floor) per output, the worst of them; ``inf`` where the outputs
    differ in number or shape, or where one side is NaN or infinite and the other is not (a NaN
    difference would otherwise vanish: ``max(0.0, nan)`` is 0.0)."""
    if len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, e in zip(actual, expected):
        a, e = np.asarray(a, dtype=np.float64), np.asarray(e, dtype=np.float64)
        if a.shape != e.shape:
            return math.inf
        with np.errstate(invalid="ignore"):
            agree = (a == e) | (np.isnan(a) & np.isnan(e))
            diff = np.where(agree, 0.0, np.abs(a - e))
        if diff.size == 0:
            continue
        if not np.isfinite(diff).all():
            return math.inf
        finite = np.abs(e[np.isfinite(e)])
        denom = max(float(finite.max()), floor) if finite.size and finite.max() > 0 else 1.0
        worst = max(worst, float(diff.max()) / denom)
    return worst


def output_error(device_model: Any, traced: TracedModel) -> float:
    """Run the compiled model once on the example inputs: its :func:`relative_error` to PyTorch,
    with the output scale floored at :data:`SCALE_FLOOR`."""
    out = device_model(*traced.example_inputs)
    actual = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
    return relative_error(actual, reference_outputs(traced), floor=SCALE_FLOOR)
