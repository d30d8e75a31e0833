"""The TVM boundary: lower a traced model to Relax, prepare it for a device, build it.

TVM's API churn (``tir`` -> ``s_tir``, string targets -> dicts) is confined to this module,
:mod:`omnic.compile.tuning` and :mod:`omnic.remote.rpc`. Recipe and pitfalls: ``shared/TVM_NOTES.md``.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from omnic.core.errors import CompileError, TraceError, UnsupportedOperatorError
from omnic.core.ir import TracedModel
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
PIPELINE_REVISION = 8


def _tvm():
    import tvm
    from tvm import relax

    return tvm, relax


# ---------------------------------------------------------------------------------- lowering
def _export(traced: TracedModel) -> torch.export.ExportedProgram:
    if traced.exported is not None:
        return traced.exported
    from torch.fx.experimental.optimization import fuse

    try:
        # Folding BN into the conv weights here is exact and spares TVM's FoldConstant, which
        # builds one LLVM function per folded constant (18 s for MobileNetV2).
        gm = fuse(traced.gm, inplace=False)
    except Exception:  # noqa: BLE001 - fuse is an optimisation; fall back to the graph as is
        gm = traced.gm
    try:
        return torch.export.export(gm, traced.example_inputs, strict=False)
    except Exception as exc:
        raise TraceError(
            f"torch.export could not capture the traced graph: {type(exc).__name__}: {str(exc)[:800]}\n"
            "  fix: remove data-dependent shapes or Python side effects from forward()") from exc


def _unsupported_op_error(exc: Exception, ep: torch.export.ExportedProgram) -> UnsupportedOperatorError:
    text = str(exc)
    names = re.findall(r"'([\w.]+)'", text.split("Unsupported function types", 1)[-1]) if (
        "Unsupported" in text) else []
    where = []
    for node in ep.graph.nodes:
        op_name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and any(n in (op_name, f"{op_name}.default") or op_name.startswith(
                n.split(".")[0] + ".") for n in names):
            stack = node.meta.get("nn_module_stack") or {}
            module = list(stack.values())[-1][0] if stack else "<top level>"
            trace_line = (node.meta.get("stack_trace") or "").strip().splitlines()
            where.append(f"{op_name} in module {module!r}" + (f" ({trace_line[-1].strip()})" if trace_line else ""))
    detail = "; ".join(where[:5]) if where else text[:500]
    return UnsupportedOperatorError(
        f"TVM's importer has no converter for {', '.join(names) or 'an operator'}: {detail}.\n"
        "  fix: replace it with a supported equivalent (e.g. AdaptiveMaxPool2d -> MaxPool2d with a fixed "
        "kernel), or run nas.adapt, which rewrites known unsupported operators")


def lower(traced: TracedModel):
    """Import the traced model into a Relax ``IRModule`` with the weights as constants.

    ExportedProgram import is used for PyTorch models (the fx importer silently mis-handles
    eval-mode BatchNorm and nearest interpolation; see TVM_NOTES 1.2).
    """
    tvm, relax = _tvm()
    if traced.source == "onnx":
        import onnx
        from tvm.relax.frontend.onnx import from_onnx

        shape_dict = {n: list(t.shape) for n, t in zip(traced.input_names, traced.example_inputs)}
        try:
            mod = from_onnx(onnx.load(traced.onnx_path), shape_dict=shape_dict, dtype_dict="float32")
        except Exception as exc:
            raise UnsupportedOperatorError(
                f"TVM could not import ONNX model {traced.onnx_path}: {type(exc).__name__}: {str(exc)[:500]}") from exc
        mod, params = relax.frontend.detach_params(mod)
        if params.get("main"):
            names = [v.name for v in mod["main"].params[len(traced.example_inputs):]]
            mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
        return mod
    from tvm.relax.frontend.torch import from_exported_program

    ep = _export(traced)
    try:
        return from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except Exception as exc:
        if "Unsupported" in str(exc):
            raise _unsupported_op_error(exc, ep) from exc
        raise CompileError(f"TVM's importer failed: {type(exc).__name__}: {str(exc)[:800]}") from exc


# ----------------------------------------------------------------------------- helper passes
def _clip_to_min_max():
    """``relax.clip`` -> ``minimum(maximum(x, lo), hi)``.

    ConvertLayout has no layout rule for clip (it wraps each ReLU6 in transposes) and
    ToMixedPrecision crashes on clip's PrimValue bounds; min/max have neither problem.
    """
    tvm, relax = _tvm()
    from tvm.relax.expr_functor import PyExprMutator, mutator

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
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mod[gv] = _ClipToMinMax().visit_expr(func)
        return mod

    return clip_to_min_max


_NUMPY_BINARY = {"relax.add": "add", "relax.multiply": "multiply", "relax.subtract": "subtract",
                 "relax.divide": "divide"}


def _fold_constants_numpy():
    """Fold permute_dims / reshape / elementwise arithmetic on constants with numpy.

    TVM's FoldConstant compiles an LLVM function for each folded expression (about 0.3 s each);
    weight transposes and reshapes are plain array operations.
    """
    import numpy as np

    tvm, relax = _tvm()
    from tvm.relax.expr_functor import PyExprMutator, mutator

    constant = tvm.ir.expr.Constant

    @mutator
    class _Folder(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if (not isinstance(call.op, tvm.ir.Op) or not call.args or not isinstance(call.args[0], constant)
                    or not hasattr(call.args[0].value, "numpy")):  # scalar constants hold Python numbers
                return call
            name = call.op.name
            a = call.args[0].value.numpy()
            if name == "relax.permute_dims":
                axes = call.attrs.axes
                result = np.transpose(a, None if axes is None else [int(i) for i in axes])
            elif name == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
                result = a.reshape([int(v) for v in call.args[1].values])
            elif (name in _NUMPY_BINARY and len(call.args) == 2 and isinstance(call.args[1], constant)
                  and hasattr(call.args[1].value, "numpy")):
                b = call.args[1].value.numpy()
                if a.dtype != b.dtype:
                    return call
                result = getattr(np, _NUMPY_BINARY[name])(a, b).astype(a.dtype)
            else:
                return call
            return relax.const(np.ascontiguousarray(result), str(result.dtype))

    @tvm.transform.module_pass(opt_level=0, name="OmnicFoldConstantsNumpy")
    def fold(mod, _ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mod[gv] = _Folder().visit_expr(func)
        return mod

    return fold


def prepare(mod, spec: DeviceSpec, target, precision: str = "fp32", *, quantization: Any = None,
            quant_report: dict | None = None, winograd: bool = False):
    """Optimise and fuse a lowered module for ``spec``; the result is what tuning sees.

    Steps (CPU): BN folding, inference decomposition, constant folding, NHWC/OHWI conv layout,
    legalize + fuse ("zero" pipeline), layout-free weight attributes (so tuned kernels may
    re-lay out weights, folded at compile time). GPU: the same without the layout change.

    int8: conv2d/matmul become integer kernels (:func:`omnic.compile.quantize.quantize_relax`) with the
    scales of ``quantization`` (an :class:`omnic.compile.quantize.Calibration`); without one, a fixed
    activation scale is used, which gives the right kernels for latency but meaningless outputs
    (``engine.compile`` always calibrates). ``quant_report``, when given, receives the rewrite's
    report (which ops run in integer).

    ``winograd`` (CPU, fp32): 3x3 stride-1 convs with enough output tiles run as Winograd
    (:mod:`omnic.compile.winograd`). ``engine.compile`` asks for it when the build applies a tuning
    database, so that tuned builds get it and untuned ones (what the latency predictor models)
    keep the direct convolutions.
    """
    tvm, relax = _tvm()
    try:
        fold_numpy = _fold_constants_numpy()
        mod = relax.transform.FoldBatchnormToConv2D()(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = fold_numpy(mod)
        with target:
            mod = relax.transform.FoldConstant()(mod)
        mod = _clip_to_min_max()(mod)
        if precision == "int8":
            from omnic.compile.quantize import quantize_relax

            mod, q_report = quantize_relax(mod, quantization, int8_depthwise=spec.int8_depthwise)
            if quant_report is not None:
                quant_report.update(q_report)
        if precision == "fp16":
            mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        if spec.kind == "cpu":
            mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
            mod = fold_numpy(mod)
            if precision == "int8" and spec.int_dot_product:
                from omnic.compile.quantize import DOT_PRODUCT_PACKINGS, pack_dot_product

                mod, n_packed = pack_dot_product(mod, spec.int_dot_product)
                if quant_report is not None:
                    quant_report["dot_product"] = DOT_PRODUCT_PACKINGS[spec.int_dot_product].instruction
                    quant_report["dot_product_packed_convs"] = n_packed
            if precision == "fp32" and winograd:
                from omnic.compile.winograd import rewrite_convs

                mod, _ = rewrite_convs(mod)
        with target:
            mod = relax.transform.FoldConstant()(mod)
            mod = relax.get_pipeline("zero")(mod)
            if spec.kind == "cpu" and precision == "fp32" and winograd:
                from omnic.compile.winograd import tag_fused_kernels

                mod = tag_fused_kernels(mod)
            if spec.kind == "cpu" and precision == "fp32":
                from omnic.compile.rules import tag_depthwise_kernels

                mod = tag_depthwise_kernels(mod)
            if spec.kind == "cpu":
                mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
                if precision == "int8":
                    from omnic.compile.quantize import strip_layout_free

                    mod = strip_layout_free(mod)
    except Exception as exc:
        raise CompileError(f"preparing the model for {spec.name} failed: {type(exc).__name__}: "
                           f"{str(exc)[:800]}") from exc
    return mod


def build(mod_prepared, spec: DeviceSpec, target, database=None):
    """Apply a tuning database (if any), schedule what is left, and build.

    Returns:
        ``(executable, final_module)``.
    """
    tvm, relax = _tvm()
    try:
        mod = mod_prepared
        if database is not None:
            with target, database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            if spec.kind == "cpu":
                # tuned kernels re-lay out their weights; split that out and fold it at compile time
                mod = relax.transform.SplitLayoutRewritePreproc()(mod)
                with target:
                    mod = relax.transform.FoldConstant()(mod)
                mod = relax.transform.DeadCodeElimination()(mod)
        if spec.kind == "gpu":
            from tvm.s_tir import dlight as dl

            with target:
                mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        # Folding the layout-rewritten weights leaves each kernel's constants in a tuple that the
        # VM would build and unpack on every call (3 builtin calls per kernel, 212 of MobileNetV2's
        # 394 VM calls per run): pass the constants to the kernels directly. A VM call costs
        # ~0.2 us, so this is < 1 % of a run, within this VM's noise in A/B rounds.
        mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
        from omnic.compile.stack_align import pipeline_for

        executable = tvm.compile(mod, target, tir_pipeline=pipeline_for(target))
    except Exception as exc:
        raise CompileError(f"building for {spec.name} failed: {type(exc).__name__}: {str(exc)[:800]}") from exc
    return executable, mod


def scheduled_kernels(mod) -> tuple[list[str], list[str]]:
    """Names of the PrimFuncs that carry a schedule (tuned or dlight) and of those that do not."""
    tvm, _ = _tvm()
    names_sched, names_plain = [], []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            is_sched = bool(attrs is not None and attrs.get("tirx.is_scheduled", False))
            (names_sched if is_sched else names_plain).append(gv.name_hint)
    return names_sched, names_plain


def device_source(executable) -> tuple[str, str] | None:
    """``(kind, source)`` of the device kernels of a GPU build (CUDA or OpenCL), else None."""
    def walk(module):
        yield module
        for sub in module.imports:
            yield from walk(sub)

    for module in walk(executable.mod):
        kind = module.kind
        if kind in ("cuda", "opencl"):
            return kind, module.inspect_source("cuda" if kind == "cuda" else "cl")
    return None
