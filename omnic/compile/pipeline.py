"""The pass pipeline that prepares a lowered module for a device kind and precision.

:func:`prepare` chains small named stages, each a list of passes for one concern, in the style of
TVM's own ``relax.get_pipeline``: importer corrections, simplification, precision, CPU layout,
fusion, then kernel attributes. Their order is fixed, since tuning records are keyed by the structural hash of the
kernels it produces.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from omnic.compile import legalize, rules, winograd
from omnic.compile.quant import (DOT_PRODUCT_PACKINGS, pack_dot_product, quantize_relax,
                                 strip_layout_free)
from omnic.core.errors import CompileError, describe
from omnic.core.targets import DeviceSpec

#: Bumped whenever lowering changes what a model compiles to (and so its latency): stored
#: measurements of an older revision are not returned as if they were of the current one.
#: 2: int8 VNNI packing pads channels; depthwise convs follow ``DeviceSpec.int8_depthwise``.
#: 3: int8 convs are packed for the AArch64 sdot too.
#: 4: tuning records are shared by kernels with the same anchor op (tuning.MODULE_EQUALITY).
#: 5: CPU kernels realign their stack frames (omnic.compile.stack_align), in the tuner's builds too.
#: 6: constants reach the kernels directly, not through a tuple the VM builds per call.
#: 7: tuned CPU fp32 builds run 3x3 stride-1 convs as Winograd (omnic.compile.winograd).
#: 8: NHWC depthwise convs are tuned in omnic's own design space (schedule_rules.DEPTHWISE_RULE).
#: 9: torch's nearest resizes are asymmetric + floor, negative squeeze axes made non-negative
#:    (omnic.compile.legalize).
PIPELINE_REVISION = 9

#: One step of the pipeline: a module pass, or a function with the same shape.
Step = Callable[[tvm.IRModule], tvm.IRModule]


# ----------------------------------------------------------------------------- helper passes
@mutator
class _ClipToMinMax(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip":
            x, lo, hi = call.args
            dtype = x.ty.dtype

            def value(p):
                return float(getattr(p.value, "value", p.value))

            return relax.op.minimum(relax.op.maximum(x, relax.const(value(lo), dtype)),
                                    relax.const(value(hi), dtype))
        return call


@tvm.transform.module_pass(opt_level=0, name="OmnicClipToMinMax")
def clip_to_min_max(mod, _ctx):
    """``relax.clip`` -> ``minimum(maximum(x, lo), hi)``.

    ConvertLayout has no layout rule for clip (it wraps each ReLU6 in transposes) and
    ToMixedPrecision crashes on clip's PrimValue bounds; min/max have neither problem.
    """
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = _ClipToMinMax().visit_expr(func)
    return mod


_NUMPY_BINARY = {"relax.add": "add", "relax.multiply": "multiply", "relax.subtract": "subtract",
                 "relax.divide": "divide"}


def _numpy_constant(expr: Any) -> np.ndarray | None:
    """The array of a tensor constant; None for anything else (scalar constants hold Python numbers)."""
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def _fold_call(call: relax.Call) -> np.ndarray | None:
    """The value of ``call`` computed with numpy, where it is a foldable op on constants."""
    if not isinstance(call.op, tvm.ir.Op) or not call.args:
        return None
    a = _numpy_constant(call.args[0])
    if a is None:
        return None
    name = call.op.name
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(a, None if axes is None else [int(i) for i in axes])
    if name == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
        return a.reshape([int(v) for v in call.args[1].values])
    if name in _NUMPY_BINARY and len(call.args) == 2:
        b = _numpy_constant(call.args[1])
        if b is not None and a.dtype == b.dtype:
            return getattr(np, _NUMPY_BINARY[name])(a, b).astype(a.dtype)
    return None


@mutator
class _NumpyFolder(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        result = _fold_call(call)
        if result is None:
            return call
        return relax.const(np.ascontiguousarray(result), str(result.dtype))


@tvm.transform.module_pass(opt_level=0, name="OmnicFoldConstantsNumpy")
def fold_constants_numpy(mod, _ctx):
    """Fold permute_dims / reshape / elementwise arithmetic on constants with numpy.

    TVM's FoldConstant compiles an LLVM function for each folded expression; weight transposes
    and reshapes are plain array operations.
    """
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = _NumpyFolder().visit_expr(func)
    return mod


def _under(target: tvm.target.Target, step: Step) -> Step:
    """``step`` run inside ``target``'s scope (passes that build code or query the target need it)."""
    def run(mod: tvm.IRModule) -> tvm.IRModule:
        with target:
            return step(mod)

    return run


# ----------------------------------------------------------------------------------- stages
def correct() -> list[Step]:
    """Fix what the importers get wrong (:mod:`omnic.compile.legalize`), before any pass sees it."""
    return list(legalize.PASSES)


def simplify(target: tvm.target.Target) -> list[Step]:
    """Inference-only rewrites and constant folding, common to every device."""
    return [relax.transform.FoldBatchnormToConv2D(), relax.transform.DecomposeOpsForInference(),
            fold_constants_numpy, _under(target, relax.transform.FoldConstant()), clip_to_min_max]


def to_precision(spec: DeviceSpec, precision: str, quantization: Any, quant_report: dict) -> list[Step]:
    """int8: integer conv2d/matmul (:func:`omnic.compile.quant.quantize_relax`); fp16: mixed precision."""
    if precision == "int8":
        def quantize(mod: tvm.IRModule) -> tvm.IRModule:
            mod, report = quantize_relax(mod, quantization, int8_depthwise=spec.int8_depthwise)
            quant_report.update(report)
            return mod

        return [quantize]
    if precision == "fp16":
        return [relax.transform.ToMixedPrecision(out_dtype="float32")]
    return []


def cpu_layout(spec: DeviceSpec, precision: str, quant_report: dict, *, winograd_convs: bool) -> list[Step]:
    """CPU only: NHWC/OHWI convs, then the conv rewrites that need that layout (dot-product
    packing for int8, Winograd for fp32 when asked)."""
    if spec.kind != "cpu":
        return []
    steps: list[Step] = [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
                         fold_constants_numpy]
    if precision == "int8" and spec.int_dot_product:
        def pack(mod: tvm.IRModule) -> tvm.IRModule:
            mod, n_packed = pack_dot_product(mod, spec.int_dot_product)
            quant_report["dot_product"] = DOT_PRODUCT_PACKINGS[spec.int_dot_product].instruction
            quant_report["dot_product_packed_convs"] = n_packed
            return mod

        steps.append(pack)
    if precision == "fp32" and winograd_convs:
        steps.append(lambda mod: winograd.rewrite_convs(mod)[0])
    return steps


def fuse(target: tvm.target.Target) -> list[Step]:
    """Fold what the rewrites left constant, legalize and fuse (TVM's "zero" pipeline)."""
    return [_under(target, relax.transform.FoldConstant()), _under(target, relax.get_pipeline("zero"))]


def kernel_attributes(spec: DeviceSpec, precision: str, target: tvm.target.Target, *,
                      winograd_convs: bool) -> list[Step]:
    """CPU only: mark the fused kernels that omnic's schedule rules handle, and let tuned kernels
    re-lay out their weights (layout-free buffers) except where the weight is already packed."""
    if spec.kind != "cpu":
        return []
    steps: list[Step] = []
    if precision == "fp32" and winograd_convs:
        steps.append(winograd.tag_fused_kernels)
    if precision == "fp32":
        steps.append(rules.tag_depthwise_kernels)
    steps.append(relax.transform.AttachAttrLayoutFreeBuffers())
    if precision == "int8":
        steps.append(strip_layout_free)
    return [_under(target, step) for step in steps]


def prepare(mod: tvm.IRModule, spec: DeviceSpec, target: tvm.target.Target, precision: str = "fp32", *,
            quantization: Any = None, quant_report: dict | None = None, winograd: bool = False) -> tvm.IRModule:
    """Optimise and fuse a lowered module for ``spec``; the result is what tuning sees.

    Steps (CPU): importer corrections (torch's nearest resize, squeeze axes), BN folding,
    inference decomposition, constant folding, NHWC/OHWI conv layout, legalize + fuse ("zero"
    pipeline), layout-free weight attributes (so tuned kernels may re-lay out weights, folded at
    compile time). GPU: the same without the layout change.

    int8: conv2d/matmul become integer kernels (:func:`omnic.compile.quant.quantize_relax`) with the
    scales of ``quantization`` (an :class:`omnic.compile.quant.Calibration`); without one, a fixed
    activation scale is used, which gives the right kernels for latency but meaningless outputs
    (``engine.compile`` always calibrates). ``quant_report``, when given, receives the rewrite's
    report (which ops run in integer).

    ``winograd`` (CPU, fp32): 3x3 stride-1 convs with enough output tiles run as Winograd
    (:mod:`omnic.compile.winograd`). ``engine.compile`` asks for it when the build applies a tuning
    database, so that tuned builds get it and untuned ones (what the latency predictor models)
    keep the direct convolutions.

    Raises:
        CompileError: A pass failed.
    """
    report = quant_report if quant_report is not None else {}
    steps = [*correct(),
             *simplify(target),
             *to_precision(spec, precision, quantization, report),
             *cpu_layout(spec, precision, report, winograd_convs=winograd),
             *fuse(target),
             *kernel_attributes(spec, precision, target, winograd_convs=winograd)]
    try:
        for step in steps:
            mod = step(mod)
    except Exception as exc:
        raise CompileError(f"preparing the model for {spec.name} failed: {describe(exc)}") from exc
    return mod
