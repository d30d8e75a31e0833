"""Integer convs over weights packed for a dot-product instruction (x86 VNNI, AArch64 sdot).

After the NHWC/OHWI layout conversion, :func:`pack_dot_product` writes each int8 conv over a
weight packed the way the device's instruction reads it, so that MetaSchedule tensorizes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

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


#: Per ``DeviceSpec.int_dot_product``. vpdpbusd: 16 lanes of 4 uint8 x int8 each; the
#: AArch64 sdot: 4 lanes of 4 int8 x int8 (MetaSchedule's "dotprod" rules tensorize it with
#: ``dot_4x4_i8i8s32_sdot`` once the weight has that layout).
DOT_PRODUCT_PACKINGS: dict[str, DotProductPacking] = {
    "vnni": DotProductPacking(instruction="vpdpbusd", out_lanes=16, in_lanes=4, activation_dtype="uint8"),
    "dotprod": DotProductPacking(instruction="sdot", out_lanes=4, in_lanes=4, activation_dtype="int8"),
}


def pack_dot_product(mod: Any, family: str) -> tuple[Any, int]:
    """Rewrite NHWC/OHWI int8 conv2d into convs over weights packed for a dot-product instruction.

    MetaSchedule tensorizes a conv with an integer dot-product instruction only when the weight
    already has ``out_lanes`` output x ``in_lanes`` input channels innermost (its tensorize
    rules match the weight's innermost axes, they do not re-lay it out): the
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
    them crashes tuning in ``RemoveWeightLayoutRewriteBlock``.
    """
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "layout_free_buffers" in func.attrs \
                and PACKED_BLOCK in func.script():
            mod[gv] = func.without_attr("layout_free_buffers")
    return mod
