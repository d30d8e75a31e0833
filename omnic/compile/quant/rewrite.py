"""int8 in Relax: conv2d / matmul with constant weights rewritten into integer kernels.

:func:`quantize_relax` (a stage of :func:`omnic.compile.pipeline.prepare`) rewrites every conv2d /
matmul whose weight is a constant into

``q(x) -> conv2d/matmul(int8|uint8 x int8 -> int32) -> astype(float32) * (s_x * s_w[o])``

where ``q(x) = clamp(round(x / s_x))`` cast to 8 bits (elementwise ops, which keep NHWC through
ConvertLayout), with per-output-channel symmetric int8 weights. The requantization is an fp32
scale multiply that FuseOps fuses, together with the bias, the activation and the *next* layer's
quantize, into the integer kernel's epilogue, so the tensors between layers are int8.
Activations that are never negative (after ReLU) are quantized to uint8 (one more bit, and the
u8 x s8 operand order that x86 VNNI wants); the others are symmetric int8. Everything else
(pooling, residual adds, softmax...) stays in fp32, which keeps it correct.

``QuantConfig(integer=False)`` produces the *simulated* form instead (quantize -> dequantize ->
fp32 conv with dequantized weights), the reference the integer form is tested against.

ONNX models that arrive quantized (QDQ) run as imported (:data:`ONNX_QDQ`): simulated int8.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import torch
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from omnic.compile.quant.calibrate import Calibration, LayerStats, QuantConfig
from omnic.core.errors import QuantizationError


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8: ``(w_q int8, scale float32 per channel along axis)``."""
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes) if reduce_axes else np.abs(w)
    scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


class _LayerMatcher:
    """Finds the calibrated layer of a Relax conv2d/matmul by its weight.

    Weights are compared by value (both sides fold BN the same way); when nothing matches by
    value (BN folded differently, e.g. an ExportedProgram input), the first unused layer of the
    same kind and weight shape is taken, which is the program order of both graphs.
    """

    def __init__(self, layers: Sequence[LayerStats]):
        self.layers = list(layers)
        self.used: set[int] = set()

    def find(self, kind: str, weight_torch_layout: np.ndarray) -> LayerStats | None:
        same_shape = [i for i, layer in enumerate(self.layers) if i not in self.used and layer.kind == kind
                      and layer.weight.shape == weight_torch_layout.shape]
        scale = float(np.abs(weight_torch_layout).max()) or 1.0
        for i in same_shape:
            if np.allclose(self.layers[i].weight, weight_torch_layout, rtol=1e-4, atol=1e-6 * scale):
                self.used.add(i)
                return self.layers[i]
        if same_shape:
            self.used.add(same_shape[0])
            return self.layers[same_shape[0]]
        return None


#: Activation scale assumed when a module is quantized without calibration (latency-only
#: compiles by the oracle's predictor): the kernels are the same, only the numbers are not.
UNCALIBRATED_SCALE = 1.0 / 32


#: Passed as ``calibration`` for ONNX models that arrive quantized (QuantizeLinear /
#: DequantizeLinear pairs): their scales are the exporter's, and they run as imported.
ONNX_QDQ = "onnx-qdq"


def require_onnx_qdq(path: str) -> None:
    """Check that an ONNX model is already quantized in QDQ form.

    Raises:
        QuantizationError: A float ONNX model (omnic calibrates PyTorch models only) or a
            QOperator model (TVM has no converters for QLinearConv and friends).
    """
    ops = {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}
    if ops & {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd"}:
        raise QuantizationError(
            f"{path} is a QOperator-format quantized model, which TVM cannot import; "
            "fix: quantize with onnxruntime's quantize_static(..., quant_format=QuantFormat.QDQ)")
    if "DequantizeLinear" not in ops:
        raise QuantizationError(
            f"{path} is a float ONNX model; int8 calibration works on PyTorch models. fix: pass the "
            "nn.Module with calibration=..., or a QDQ model from onnxruntime's quantize_static")


def quantize_relax(mod: Any, calibration: Calibration | str | None, *, config: QuantConfig | None = None,
                   int8_depthwise: bool = True) -> tuple[Any, dict[str, Any]]:
    """Rewrite conv2d / matmul with constant weights into int8 (or simulated int8) form.

    Run on a module in the layout PyTorch exports (NCHW/OIHW, matmul weights ``[in, out]``),
    after constant folding and before layout conversion and fusion.

    Args:
        mod: The Relax ``IRModule``.
        calibration: From :func:`calibrate`; None quantizes with a fixed activation scale (for
            latency measurements only: the outputs are not meaningful).
        config: Defaults to ``calibration.config``.
        int8_depthwise: The device's choice for depthwise convs, used when ``config.depthwise``
            is ``"auto"``.

    Returns:
        ``(module, report)``; report: ``{"int8": {op: count}, "float32": {op: count}, "layers": [...]}``.
    """
    if calibration == ONNX_QDQ:
        return mod, _qdq_report(mod)
    config = config or (calibration.config if calibration is not None else QuantConfig())
    matcher = _LayerMatcher(calibration.layers if calibration is not None else ())
    report: dict[str, Any] = {"int8": {}, "float32": {}, "layers": []}
    depthwise_int8 = int8_depthwise if config.depthwise == "auto" else config.depthwise == "int8"
    report["depthwise"] = "int8" if depthwise_int8 else "fp32"

    def count(precision: str, op: str) -> None:
        report[precision][op] = report[precision].get(op, 0) + 1

    def const_value(expr: Any, lookup: Any) -> np.ndarray | None:
        if isinstance(expr, relax.Var):
            bound = lookup(expr)
            expr = bound if bound is not None else expr
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
            return expr.value.numpy()
        return None

    @mutator
    class _Quantizer(PyExprMutator):
        def _act(self, x: Any, stats: LayerStats | None) -> tuple[Any, float, str]:
            if stats is None:
                scale, dtype = UNCALIBRATED_SCALE, "int8"
            else:
                scale, dtype = stats.activation_qparams(config)
            lo, hi = (0.0, 255.0) if dtype == "uint8" else (-128.0, 127.0)
            # round(x / s) clamped, written with elementwise ops rather than relax.quantize:
            # ConvertLayout has layout rules for these (quantize gets wrapped in two transposes)
            r = relax.op.round(relax.op.multiply(x, relax.const(1.0 / scale, "float32")))
            q = self.builder_.emit(relax.op.astype(relax.op.minimum(relax.op.maximum(
                r, relax.const(lo, "float32")), relax.const(hi, "float32")), dtype))
            return q, scale, dtype

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            name = call.op.name
            if name == "relax.nn.conv2d":
                return self._conv2d(call)
            if name == "relax.matmul":
                return self._matmul(call)
            return call

        def _conv2d(self, call):
            attrs = call.attrs
            w = const_value(call.args[1], self.lookup_binding)
            if (w is None or w.dtype != np.float32 or str(attrs.data_layout) != "NCHW"
                    or str(attrs.kernel_layout) != "OIHW" or call.args[0].ty.dtype != "float32"):
                count("float32", "conv2d")
                return call
            groups, in_channels = int(attrs.groups), int(call.args[0].ty.shape[1])
            if not depthwise_int8 and groups > 1 and groups == in_channels:
                count("float32", "conv2d_depthwise")
                return call
            stats = matcher.find("conv2d", w)
            if stats is None and calibration is not None:
                count("float32", "conv2d")
                return call
            w_q, s_w = quantize_weight(w, axis=0)
            x_q, s_x, dtype = self._act(call.args[0], stats)
            kw = dict(strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation, groups=attrs.groups,
                      data_layout="NCHW", kernel_layout="OIHW", out_layout=attrs.out_layout)
            if config.integer:
                acc = self.builder_.emit(relax.op.nn.conv2d(x_q, relax.const(w_q), out_dtype="int32", **kw))
                out = self.builder_.emit(relax.op.astype(acc, "float32"))
                rq = (s_x * s_w.astype(np.float64)).astype(np.float32).reshape(1, -1, 1, 1)
                result = relax.op.multiply(out, relax.const(rq))
            else:
                x_f = self.builder_.emit(relax.op.multiply(relax.op.astype(x_q, "float32"),
                                                           relax.const(s_x, "float32")))
                w_f = (w_q.astype(np.float32) * s_w.reshape(-1, 1, 1, 1)).astype(np.float32)
                result = relax.op.nn.conv2d(x_f, relax.const(w_f), out_dtype="float32", **kw)
            count("int8", "conv2d")
            report["layers"].append({"op": "conv2d", "layer": stats.name if stats else None, "act_dtype": dtype,
                                     "act_scale": s_x, "weight_shape": list(w.shape)})
            return result

        def _matmul(self, call):
            w = const_value(call.args[1], self.lookup_binding)
            x = call.args[0]
            if w is None or w.ndim != 2 or w.dtype != np.float32 or x.ty.dtype != "float32":
                count("float32", "matmul")
                return call
            stats = matcher.find("linear", np.ascontiguousarray(w.T))
            if stats is None and calibration is not None:
                count("float32", "matmul")
                return call
            w_q, s_w = quantize_weight(w, axis=1)
            x_q, s_x, dtype = self._act(x, stats)
            if config.integer:
                acc = self.builder_.emit(relax.op.matmul(x_q, relax.const(w_q), out_dtype="int32"))
                out = self.builder_.emit(relax.op.astype(acc, "float32"))
                rq = (s_x * s_w.astype(np.float64)).astype(np.float32)
                result = relax.op.multiply(out, relax.const(rq))
            else:
                x_f = self.builder_.emit(relax.op.multiply(relax.op.astype(x_q, "float32"),
                                                           relax.const(s_x, "float32")))
                w_f = (w_q.astype(np.float32) * s_w.reshape(1, -1)).astype(np.float32)
                result = relax.op.matmul(x_f, relax.const(w_f), out_dtype="float32")
            count("int8", "matmul")
            report["layers"].append({"op": "matmul", "layer": stats.name if stats else None, "act_dtype": dtype,
                                     "act_scale": s_x, "weight_shape": list(w.shape)})
            return result

    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = _Quantizer().visit_expr(func)
    mod = relax.transform.DeadCodeElimination()(mod)  # the fp32 weights the rewrite replaced
    report["calibrated"] = calibration is not None
    return mod, report


def _qdq_report(mod: Any) -> dict[str, Any]:
    """ONNX QDQ models run as imported: quantize/dequantize pairs around fp32 kernels."""
    counts: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            name = expr.op.name.replace("relax.nn.", "").replace("relax.", "")
            counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    simulated = {k: counts[k] for k in ("quantize", "dequantize") if k in counts}
    fp32 = {k: counts[k] for k in ("conv2d", "matmul") if k in counts}
    return {"int8": {}, "float32": fp32, "simulated_int8": simulated, "layers": [], "calibrated": ONNX_QDQ}


def ops_precision(report: dict[str, Any]) -> dict[str, Any]:
    """The compile report's ``ops_precision`` entry for an int8 build."""
    out = {"int8": dict(report.get("int8", {})), "float32": {**report.get("float32", {}),
                                                             "other": "all remaining ops"}}
    if report.get("simulated_int8"):  # Q/DQ pairs kept as is: int8 storage, fp32 arithmetic
        out["simulated_int8"] = dict(report["simulated_int8"])
    return out


def accuracy_vs_fp32(device_model: Any, calibration: Calibration) -> dict[str, Any] | None:
    """Run the compiled model on the kept calibration samples and compare with fp32 PyTorch.

    The samples are fed in chunks of the compiled batch size (shapes are static); a remainder
    smaller than one batch is left out.

    Returns:
        ``{"samples", "max_rel_error", "mean_abs_error", "top1_agreement"}`` (top-1 agreement of
        the first output's argmax over its last axis, for classifier-like 2-D outputs), or None
        when there are not enough samples for one compiled batch.
    """
    if not calibration.inputs or calibration.reference is None:
        return None
    batch = int(device_model.input_shapes[0][0])
    n = (int(calibration.inputs[0].shape[0]) // batch) * batch
    if n == 0:
        return None
    outs = []
    for start in range(0, n, batch):
        out = device_model(*[x[start:start + batch] for x in calibration.inputs])
        outs.append(out[0] if isinstance(out, tuple) else out)
    actual = torch.cat(outs).double()
    expected = calibration.reference[:n].double()
    diff = (actual - expected).abs()
    result: dict[str, Any] = {
        "samples": n,
        "max_rel_error": float(diff.max() / max(float(expected.abs().max()), 1e-12)),
        "mean_abs_error": float(diff.mean()),
        "top1_agreement": None,
    }
    if expected.ndim == 2 and expected.shape[1] > 1:
        result["top1_agreement"] = float((actual.argmax(1) == expected.argmax(1)).double().mean())
    return result
