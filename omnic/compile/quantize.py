"""int8 post-training quantization: calibration on the fx graph, integer kernels in Relax.

The flow (``engine.compile(model, {"precision": "int8"}, x, calibration=batches)``):

1. :func:`calibrate` runs the fp32 model (BN folded, exactly as :func:`omnic.compile.compiler.lower`
   exports it) over the calibration batches with an fx ``Interpreter`` that observes the input
   of every conv2d and linear layer (min/max, and a per-batch percentile of ``|x|``). Observers
   are written on the fx graph rather than through torchao's PT2E flow: torch 2.13 no longer ships
   ``quantize_pt2e``, and TVM's importer has no converter for the Q/DQ ops it produces
   (TVM_NOTES 6.2).
2. :func:`quantize_relax` (called by ``compiler.prepare``) rewrites every conv2d / matmul whose
   weight is a constant into

   ``q(x) -> conv2d/matmul(int8|uint8 x int8 -> int32) -> astype(float32) * (s_x * s_w[o])``

   where ``q(x) = clamp(round(x / s_x))`` cast to 8 bits (elementwise ops, which keep NHWC
   through ConvertLayout), with per-output-channel symmetric int8 weights. The requantization is
   an fp32 scale multiply that FuseOps fuses, together with the bias, the activation and the
   *next* layer's quantize, into the integer kernel's epilogue, so the tensors between layers are int8. Activations that
   are never negative (after ReLU) are quantized to uint8 (one more bit, and the u8 x s8 operand
   order that x86 VNNI wants); the others are symmetric int8.
   Everything else (pooling, residual adds, softmax...) stays in fp32, which keeps it correct.
3. ``integer=False`` produces the *simulated* form instead (quantize -> dequantize -> fp32 conv
   with dequantized weights), the reference the integer form is tested against.
4. On x86 VNNI devices, :func:`pack_vnni` (after layout conversion) writes the NHWC int8 convs
   over packed weights so that MetaSchedule tensorizes them with ``vpdpbusd``.

ONNX models that arrive quantized (QDQ) run as imported (:data:`ONNX_QDQ`): simulated int8.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from omnic.core.errors import QuantizationError

CALIBRATION_METHODS = ("minmax", "percentile")
DEPTHWISE_CHOICES = ("auto", "int8", "fp32")



@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a model is quantized to int8.

    Attributes:
        method: ``"minmax"`` (activation range = the observed range) or ``"percentile"`` (range
            = the mean over batches of the ``percentile``-th percentile of ``|x|``; clips rare
            outliers, which usually helps when the calibration set is large).
        percentile: Percentile used by ``"percentile"`` (0 < p <= 100).
        max_batches: Calibration batches used at most (None: all).
        integer: True: int8 x int8 -> int32 kernels; False: simulated quantization
            (dequantize -> fp32), for reference and debugging.
        unsigned_activations: Quantize activations that were never negative during calibration
            to uint8 (scale = max/255) instead of int8 (scale = max/127).
        accuracy_samples: Calibration samples the compiled int8 model is run on to report its
            difference to the fp32 model (0 turns the check off).
        depthwise: Precision of depthwise convs: ``"auto"`` (the device's
            ``DeviceSpec.int8_depthwise``: int8 only where the device's integer path runs them
            faster), ``"int8"`` or ``"fp32"``. A depthwise conv has no channel reduction for a
            dot-product instruction to use.
    """

    method: str = "minmax"
    percentile: float = 99.99
    max_batches: int | None = 64
    integer: bool = True
    unsigned_activations: bool = True
    accuracy_samples: int = 256
    depthwise: str = "auto"

    def __post_init__(self) -> None:
        if self.depthwise not in DEPTHWISE_CHOICES:
            raise QuantizationError(f"QuantConfig.depthwise must be one of {DEPTHWISE_CHOICES}, "
                                    f"got {self.depthwise!r}")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizationError(f"QuantConfig.method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise QuantizationError(f"QuantConfig.percentile must be in (0, 100], got {self.percentile!r}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise QuantizationError(f"QuantConfig.max_batches must be positive or None, got {self.max_batches!r}")

    @classmethod
    def coerce(cls, value: "QuantConfig | dict[str, Any] | str | None") -> "QuantConfig":
        """Accept a QuantConfig, a dict of its fields, a method name, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            return cls(**value)
        raise QuantizationError(
            f"quantization must be a QuantConfig, a dict or a method name, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class LayerStats:
    """What calibration learnt about the input of one conv2d / linear layer.

    Attributes:
        name: The fx node (for reports).
        kind: ``"conv2d"`` or ``"linear"``.
        weight: The layer's fp32 weight as PyTorch holds it (after BN folding); used to find
            the layer again in the Relax graph.
        amin: Smallest observed input value.
        amax: Largest observed input value.
        pct: Mean per-batch percentile of ``|x|`` (None unless the method is ``"percentile"``).
    """

    name: str
    kind: str
    weight: np.ndarray
    amin: float
    amax: float
    pct: float | None = None

    def activation_qparams(self, config: QuantConfig) -> tuple[float, str]:
        """``(scale, dtype)`` of this layer's quantized input."""
        unsigned = config.unsigned_activations and self.amin >= 0.0
        bound = self.pct if (config.method == "percentile" and self.pct is not None) else max(abs(self.amin),
                                                                                              abs(self.amax))
        bound = max(float(bound), 1e-8)
        return (bound / 255.0, "uint8") if unsigned else (bound / 127.0, "int8")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        layers: Per-layer statistics, in graph order.
        config: The settings used.
        batches: Calibration batches run.
        samples: Calibration samples run (sum of batch sizes).
        inputs: Up to ``config.accuracy_samples`` calibration samples, per model input (tensors),
            kept to measure the compiled model's difference to fp32.
        reference: The fp32 model's outputs on ``inputs`` (first output only).
        source: Where the data came from (``"calibration"`` or ``"example_inputs"``).
    """

    layers: tuple[LayerStats, ...]
    config: QuantConfig
    batches: int
    samples: int
    inputs: tuple[torch.Tensor, ...] = ()
    reference: torch.Tensor | None = None
    source: str = "calibration"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description for the compile report."""
        return {"method": self.config.method, "percentile": self.config.percentile if self.config.method ==
                "percentile" else None, "batches": self.batches, "samples": self.samples,
                "layers_observed": len(self.layers), "source": self.source,
                "integer": self.config.integer}


# ------------------------------------------------------------------------------ calibration
_CONV_FUNCS = {torch.nn.functional.conv2d, torch.conv2d}
_LINEAR_FUNCS = {torch.nn.functional.linear}
for _name, _bucket in (("conv2d", _CONV_FUNCS), ("linear", _LINEAR_FUNCS)):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None:
        _bucket.add(_op.default)


def fused_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph ``compiler.lower`` exports: conv+BN folded, so weights match the Relax constants."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(gm, inplace=False)
    except Exception:  # noqa: BLE001 - mirrors compiler._export, which falls back the same way
        return gm


def _layer_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Conv2d):
            return "conv2d"
        if isinstance(mod, nn.Linear):
            return "linear"
    elif node.op == "call_function":
        if node.target in _CONV_FUNCS:
            return "conv2d"
        if node.target in _LINEAR_FUNCS:
            return "linear"
    return None


@dataclass
class _Observer:
    kind: str
    weight: np.ndarray | None = None
    amin: float = float("inf")
    amax: float = float("-inf")
    pcts: list[float] = field(default_factory=list)

    def observe(self, x: torch.Tensor, weight: torch.Tensor, percentile: float | None) -> None:
        x = x.detach().float()
        if self.weight is None:
            self.weight = weight.detach().float().numpy().copy()
        self.amin = min(self.amin, float(x.min()))
        self.amax = max(self.amax, float(x.max()))
        if percentile is not None:
            flat = x.abs().flatten()
            if flat.numel() > 1_000_000:  # torch.quantile refuses very large inputs; a sample suffices
                flat = flat[torch.randint(0, flat.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))]
            self.pcts.append(float(torch.quantile(flat, percentile / 100.0)))


class _ObservingInterpreter(fx.Interpreter):
    """Runs the graph and feeds every conv2d/linear input to its observer."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, _Observer], percentile: float | None):
        super().__init__(gm)
        self.observers = observers
        self.percentile = percentile

    def run_node(self, n: fx.Node) -> Any:
        obs = self.observers.get(n)
        if obs is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            weight = self.module.get_submodule(str(n.target)).weight if n.op == "call_module" else args[1]
            obs.observe(args[0], weight, self.percentile)
        return super().run_node(n)


def _batches(calibration: Any, n_inputs: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Normalise a tensor, a DataLoader, or an iterable of batches to tuples of input tensors.

    A batch may be a tensor, or a tuple/list whose first ``n_inputs`` items are the model inputs
    (so ``(images, labels)`` from a labelled DataLoader works as is).
    """
    if isinstance(calibration, (torch.Tensor, np.ndarray)):
        yield (torch.as_tensor(calibration),)
        return
    if isinstance(calibration, (tuple, list)) and calibration and all(
            isinstance(c, (torch.Tensor, np.ndarray)) for c in calibration) and n_inputs > 1 and len(
            calibration) == n_inputs:
        yield tuple(torch.as_tensor(c) for c in calibration)
        return
    try:
        iterator = iter(calibration)
    except TypeError:
        raise QuantizationError(
            f"calibration must be a tensor, a DataLoader or an iterable of batches, got "
            f"{type(calibration).__name__}") from None
    for batch in iterator:
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            yield (torch.as_tensor(batch),)
        elif isinstance(batch, (tuple, list)) and len(batch) >= n_inputs:
            yield tuple(torch.as_tensor(b) for b in batch[:n_inputs])
        elif isinstance(batch, dict):
            raise QuantizationError("calibration batches that are dicts are not supported; yield tensors or "
                                    "(inputs..., label) tuples")
        else:
            raise QuantizationError(f"a calibration batch must be a tensor or a tuple of tensors, got "
                                    f"{type(batch).__name__}")


def calibrate(traced: Any, calibration: Any, config: QuantConfig | None = None, *,
              source: str = "calibration") -> Calibration:
    """Observe the conv2d/linear inputs of ``traced`` on the calibration data.

    Args:
        traced: An :class:`omnic.core.ir.TracedModel` with an fx graph (PyTorch models).
        calibration: A tensor (one batch), a DataLoader, or an iterable of batches (tensors, or
            tuples whose first items are the inputs, e.g. ``(images, labels)``).
        config: Quantization settings.
        source: Recorded in the report (``"example_inputs"`` when no calibration set was given).

    Returns:
        The per-layer statistics plus a few samples and their fp32 outputs for the accuracy check.

    Raises:
        QuantizationError: No fx graph (ONNX input), no batches, or batches of the wrong shape.
    """
    config = config or QuantConfig()
    if traced.gm is None:
        raise QuantizationError(
            "int8 calibration needs a PyTorch model (an fx graph); this model came from "
            f"{traced.source!r}. fix: pass the nn.Module, or an ONNX model without calibration")
    gm = fused_graph(traced.gm)
    observers = {n: _Observer(kind) for n in gm.graph.nodes if (kind := _layer_kind(gm, n)) is not None}
    interp = _ObservingInterpreter(gm, observers, config.percentile if config.method == "percentile" else None)
    n_inputs = len(traced.example_inputs)
    kept: list[list[torch.Tensor]] = [[] for _ in range(n_inputs)]
    refs: list[torch.Tensor] = []
    n_batches = n_samples = 0
    with torch.no_grad():
        for batch in itertools.islice(_batches(calibration, n_inputs), config.max_batches):
            batch = tuple(b.to(e.dtype) for b, e in zip(batch, traced.example_inputs))
            for b, e in zip(batch, traced.example_inputs):
                if tuple(b.shape[1:]) != tuple(e.shape[1:]):
                    raise QuantizationError(
                        f"calibration batch of shape {tuple(b.shape)} does not match the example input "
                        f"{tuple(e.shape)} (all but the batch dimension must agree)")
            try:
                out = interp.run(*batch)
            except Exception as exc:
                raise QuantizationError(f"the model failed on a calibration batch: {type(exc).__name__}: "
                                        f"{str(exc)[:300]}") from exc
            n_batches += 1
            n_samples += int(batch[0].shape[0])
            have = sum(int(k.shape[0]) for k in kept[0])
            if have < config.accuracy_samples:
                take = config.accuracy_samples - have
                for i, b in enumerate(batch):
                    kept[i].append(b[:take].clone())
                first = out[0] if isinstance(out, (tuple, list)) else out
                refs.append(first[:take].detach().clone())
    if n_batches == 0:
        raise QuantizationError("the calibration data yielded no batches")
    layers = tuple(LayerStats(name=n.name, kind=o.kind, weight=o.weight, amin=o.amin, amax=o.amax,
                              pct=(float(np.mean(o.pcts)) if o.pcts else None))
                   for n, o in observers.items() if o.weight is not None)
    inputs = tuple(torch.cat(k) for k in kept) if kept[0] else ()
    return Calibration(layers=layers, config=config, batches=n_batches, samples=n_samples, inputs=inputs,
                       reference=torch.cat(refs) if refs else None, source=source)


# ------------------------------------------------------------------------ the Relax rewrite
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
    import onnx

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
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

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
    import tvm
    from tvm import relax

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


# ------------------------------------------------- dot-product packed convs (x86 VNNI, ARM sdot)
#: PrimFunc blocks of packed convs carry this name, so later steps can recognise them.
PACKED_BLOCK = "conv2d_nhwc_dot_packed"
VNNI_BLOCK = PACKED_BLOCK  # the name earlier releases used


@dataclass(frozen=True, kw_only=True)
class DotProductPacking:
    """The weight layout and operand types an integer dot-product instruction wants.

    Attributes:
        instruction: What MetaSchedule tensorizes the packed conv with (for reports).
        out_lanes: Output channels per instruction (int32 lanes).
        in_lanes: Input channels each lane reduces (bytes per lane).
        activation_dtype: The type the instruction reads activations as; the weights are int8.
    """

    instruction: str
    out_lanes: int
    in_lanes: int
    activation_dtype: str


#: Per ``DeviceSpec.int_dot_product``. vpdpbusd: 16 lanes of 4 uint8 x int8 (TVM_NOTES 10); the
#: AArch64 sdot: 4 lanes of 4 int8 x int8 (MetaSchedule's "dotprod" rules tensorize it with
#: ``dot_4x4_i8i8s32_sdot`` once the weight has that layout).
DOT_PRODUCT_PACKINGS: dict[str, DotProductPacking] = {
    "vnni": DotProductPacking(instruction="vpdpbusd", out_lanes=16, in_lanes=4, activation_dtype="uint8"),
    "dotprod": DotProductPacking(instruction="sdot", out_lanes=4, in_lanes=4, activation_dtype="int8"),
}


def pack_dot_product(mod: Any, family: str) -> tuple[Any, int]:
    """Rewrite NHWC/OHWI int8 conv2d into convs over weights packed for a dot-product instruction.

    MetaSchedule tensorizes a conv with an integer dot-product instruction only when the weight
    already has ``out_lanes`` output x ``in_lanes`` input channels innermost (TVM_NOTES 10): the
    weight is packed to ``[O/out, KH, KW, I/in, out, in]`` and the conv is written in TE.
    Activations of the other signedness are shifted by 128 into the instruction's type (padded
    with the shifted zero), and ``shift * sum(w[o])`` is subtracted from the accumulator (it
    fuses into the requantize epilogue).

    Convs with groups 1 and dilation 1 are packed. Channel counts that do not fill the packing
    are padded with zero weights: input channels to a multiple of ``in_lanes`` (the RGB stem's 3
    become 4, the activation gets a zero channel in the same pad op as the spatial padding),
    output channels to a multiple of ``out_lanes`` (MobileNet's 24 become 32 for VNNI), with the
    extra outputs sliced off after the conv.

    Args:
        mod: The Relax module after the NHWC/OHWI layout conversion.
        family: A key of :data:`DOT_PRODUCT_PACKINGS`.

    Returns:
        ``(module, number of packed convs)``.
    """
    import tvm
    from tvm import relax, te, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    packing = DOT_PRODUCT_PACKINGS[family]
    lo, li = packing.out_lanes, packing.in_lanes

    def conv_packed(padded, wpk, *, stride, kernel, out_channels):
        n, h, w, c = (int(d) for d in padded.shape)
        (sh, sw), (kh, kw) = stride, kernel
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, c), "rc")
        return te.compute(
            (n, oh, ow, out_channels),
            lambda b, y, x, o: te.sum(
                padded[b, y * sh + ry, x * sw + rx, rc].astype("int32")
                * wpk[o // lo, ry, rx, rc // li, o % lo, rc % li].astype("int32"), axis=[ry, rx, rc]),
            name=PACKED_BLOCK)

    packed = 0

    @mutator
    class _Packer(PyExprMutator):
        def visit_call_(self, call):
            nonlocal packed
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            attrs, (x, w_expr) = call.attrs, call.args
            if isinstance(w_expr, relax.Var):
                w_expr = self.lookup_binding(w_expr) or w_expr
            if not (isinstance(w_expr, tvm.ir.expr.Constant) and hasattr(w_expr.value, "numpy")):
                return call
            w = w_expr.value.numpy()
            if (str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "OHWI"
                    or str(attrs.out_dtype) != "int32" or w.dtype != np.int8 or int(attrs.groups) != 1
                    or any(int(d) != 1 for d in attrs.dilation) or x.ty.dtype not in ("uint8", "int8")
                    or str(attrs.out_layout) not in ("NHWC", "")):
                return call
            o, kh, kw, i = w.shape
            o_pad, i_pad = -o % lo, -i % li
            w_full = np.pad(w, ((0, o_pad), (0, 0), (0, 0), (0, i_pad))) if (o_pad or i_pad) else w
            op, ip = o + o_pad, i + i_pad
            wpk = np.ascontiguousarray(w_full.reshape(op // lo, lo, kh, kw, ip // li, li).transpose(0, 2, 3, 4, 1, 5))
            shift = 0
            if x.ty.dtype != packing.activation_dtype:  # exact in int32, then narrowed
                shift = 128 if packing.activation_dtype == "uint8" else -128
                x = self.builder_.emit(relax.op.astype(relax.op.add(relax.op.astype(x, "int32"),
                                                                    relax.const(shift, "int32")),
                                                       packing.activation_dtype))
            pt, pl, pb, pr = (int(p) for p in attrs.padding)
            if pt or pl or pb or pr or i_pad:
                # padding as its own (injective) op: it fuses into the producer's epilogue, and the
                # conv stays a pure reduction that FuseOps fuses with its requantize epilogue (the
                # padded input channels meet zero weights, so their value does not matter)
                x = self.builder_.emit_te(topi.nn.pad, x, [0, pt, pl, 0], [0, pb, pr, i_pad],
                                          pad_value=shift, primfunc_name_hint="pad_dot_packed")
            # call_te, not emit_te: returning a bound Var would leave an alias binding that stops
            # FuseOps from fusing the conv with its requantize epilogue
            acc = self.builder_.call_te(
                conv_packed, x, relax.const(wpk), stride=tuple(int(s) for s in attrs.strides), kernel=(kh, kw),
                out_channels=op, primfunc_name_hint=f"conv2d_{family}")
            packed += 1
            if o_pad:
                acc = relax.op.strided_slice(self.builder_.emit(acc), axes=[3], begin=[0], end=[o])
            if shift:
                correction = (shift * w.astype(np.int32).reshape(o, -1).sum(axis=1)).astype(np.int32)
                return relax.op.subtract(self.builder_.emit(acc), relax.const(correction))
            return acc

    packer = _Packer(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            packer.builder_.update_func(gv, packer.visit_expr(func))
    out = packer.builder_.get()
    return relax.transform.DeadCodeElimination()(out), packed


def pack_vnni(mod: Any) -> tuple[Any, int]:
    """:func:`pack_dot_product` for x86 VNNI."""
    return pack_dot_product(mod, "vnni")


def strip_layout_free(mod: Any) -> Any:
    """Drop ``layout_free_buffers`` from PrimFuncs holding a dot-product packed conv.

    Their weight is already in its final layout, and MetaSchedule's weight-layout rewrite on
    them crashes tuning in ``RemoveWeightLayoutRewriteBlock`` (TVM_NOTES 10).
    """
    import tvm

    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "layout_free_buffers" in func.attrs \
                and PACKED_BLOCK in func.script():
            mod[gv] = func.without_attr("layout_free_buffers")
    return mod


def register_vnni_intrinsic() -> None:
    """Make MetaSchedule's ``dot_16x4_vnni`` build with the bundled LLVM 22 (see
    :func:`omnic.compile.vnni.register_vnni_intrinsic`)."""
    from omnic.compile.vnni import register_vnni_intrinsic as register

    register()
