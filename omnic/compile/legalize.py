"""Relax rewrites that correct what TVM's importers emit, before any pass relies on it.

Each pass here fixes a miscompilation the differential fuzzer (``tests/fuzz``) found, at the Relax
level, so that every later stage (precision, layout, fusion, tuning) sees a correct program:

- :func:`nearest_resize_asymmetric`: PyTorch's ``nearest`` interpolation is ``src = floor(dst *
  in / out)``; TVM's ExportedProgram importer emits ``resize2d`` with half-pixel coordinates and
  rounding, which agrees with it only for whole-multiple upscales.
- :func:`squeeze_axes_non_negative`: ``relax.transform.ConvertLayout`` dies with ``std::bad_alloc``
  on a ``squeeze`` with a negative axis (``nn.MultiheadAttention``'s packed in-projection exports
  one on a 5-d tensor).

The other ops with axis attributes that ConvertLayout rewrites (expand_dims, concat, split,
mean/sum/max/variance, softmax/log_softmax, take, strided_slice, layer_norm, cumsum, flip, argmax,
repeat, gather_elements) were each checked with a negative axis after an NHWC conv: they convert
and compute correctly, so they are left alone (rewriting them would change kernels, and so tuning
records, for nothing). ``relax.stack`` crashes ConvertLayout with any axis, but ``torch.export``
decomposes ``torch.stack`` into unsqueeze + cat, so no model omnic lowers reaches it.
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

#: What TVM's ExportedProgram importer gives ``aten.upsample_nearest2d`` (``_upsample_impl``):
#: half-pixel coordinates and the resize2d default rounding ``"round"``. The ONNX importer always
#: passes the model's ``nearest_mode`` (``round_prefer_floor`` by default, never plain ``round``),
#: so ONNX resizes, whose attributes are the model's own and correct, do not match.
_TORCH_NEAREST = ("nearest_neighbor", "half_pixel", "round")


def _op_name(call: relax.Call) -> str:
    return call.op.name if isinstance(call.op, tvm.ir.Op) else ""


def _ndim(expr: relax.Expr) -> int:
    """The rank of a tensor expression, -1 where unknown."""
    ty = expr.ty
    return int(ty.ndim) if isinstance(ty, relax.TensorType) else -1


@mutator
class _Legalizer(PyExprMutator):
    """Applies one ``rewrite(call) -> call | None`` to every call, innermost first."""

    def __init__(self, rewrite, mod=None):
        super().__init__(mod)
        self.rewrite = rewrite

    def visit_call_(self, call):
        call = super().visit_call_(call)
        new = self.rewrite(call)
        return call if new is None else new


def _function_pass(name: str, rewrite):
    """A module pass that runs ``rewrite`` over every Relax function of the module."""
    def transform(mod, _ctx):
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mod[gv] = _Legalizer(rewrite, mod).visit_expr(func)
        return mod

    return tvm.transform.module_pass(transform, opt_level=0, name=name)


# ------------------------------------------------------------------------------ nearest resize
def _nearest_resize(call: relax.Call) -> relax.Expr | None:
    if _op_name(call) != "relax.image.resize2d":
        return None
    attrs = call.attrs
    if (str(attrs.method), str(attrs.coordinate_transformation_mode), str(attrs.rounding_method)) != _TORCH_NEAREST:
        return None
    out_dtype = attrs.out_dtype  # None unless the importer asked for a cast
    return relax.op.image.resize2d(
        call.args[0], call.args[1], roi=[float(v) for v in attrs.roi], layout=str(attrs.layout),
        method="nearest_neighbor", coordinate_transformation_mode="asymmetric", rounding_method="floor",
        cubic_alpha=float(attrs.cubic_alpha), cubic_exclude=int(attrs.cubic_exclude),
        extrapolation_value=float(attrs.extrapolation_value),
        out_dtype=None if out_dtype is None else str(out_dtype))


#: ``resize2d(nearest, half_pixel, round)`` from the torch importer -> ``(nearest, asymmetric,
#: floor)``, PyTorch's ``nearest``: exact for every output size given as ``size=``, and for whole
#: ``scale_factor``s. (A fractional ``scale_factor`` makes PyTorch use ``1 / scale`` rather than
#: ``in / out``; the importer keeps only the rounded output size, so that case cannot be told apart
#: here.)
nearest_resize_asymmetric = _function_pass("OmnicNearestResizeAsymmetric", _nearest_resize)


# -------------------------------------------------------------------------------- squeeze axes
def _squeeze_axes(call: relax.Call) -> relax.Expr | None:
    if _op_name(call) != "relax.squeeze" or call.attrs.axis is None:
        return None
    ndim = _ndim(call.args[0])
    axes = [int(a) for a in call.attrs.axis]
    if ndim < 0 or all(a >= 0 for a in axes):
        return None
    return relax.op.squeeze(call.args[0], [a + ndim if a < 0 else a for a in axes])


#: ``squeeze(x, axis=[-2])`` -> ``squeeze(x, axis=[ndim - 2])`` (ConvertLayout's squeeze rule
#: indexes the layout string with the raw axis).
squeeze_axes_non_negative = _function_pass("OmnicSqueezeAxesNonNegative", _squeeze_axes)


#: The passes in the order :func:`omnic.compile.pipeline.prepare` runs them.
PASSES = (nearest_resize_asymmetric, squeeze_axes_non_negative)
