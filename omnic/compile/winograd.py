"""Winograd F(m x m, 3 x 3) convolution for CPU fp32 (NHWC data, OHWI weights).

A 3x3 stride-1 convolution computes each m x m output tile from an (m+2) x (m+2) input tile.
Winograd's minimal filtering does that with (m+2)^2 multiplications per input/output channel
pair instead of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4. The work becomes

1. a data transform ``V = B^T d B`` of every input tile (cheap, memory-bound),
2. (m+2)^2 independent matrix products ``M[e, u] = V[e, u] @ U[e, u]`` over the input channels,
   where ``U = G g G^T`` is the transformed weight, computed here once, at compile time,
3. an inverse transform ``Y = A^T M A`` back to the output tile.

Step 2 is an ordinary batched GEMM that MetaSchedule tunes like any other. Steps 1 and 3 are
written out as explicit sparse sums (the transform matrices are mostly 0 and +-1), selected by
tile position, so that once a schedule unrolls the tile loops each element is a handful of adds;
TVM registers CPU schedules for neither TOPI's winograd transforms nor these, so
:mod:`omnic.compile.rules.winograd_transform` carries one.

ONNX Runtime's CPU convolutions (MLAS) are direct/GEMM ones, so this is where a compiler can
pass it on compute-bound networks such as ResNet-18. It pays only where the output has enough tiles:
each transformed weight is (m+2)^2 / 9 times larger (4x for m = 4, 1.8x for m = 2), and at small
spatial sizes the weights stream from memory for few tiles. :func:`eligible` says where it is used.
"""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax, s_tir, te, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

from omnic.compile.rules.marking import (DATA_TRANSFORM_RULE, INVERSE_TRANSFORM_RULE, WINOGRAD_KERNEL_KEY,
                                         mark_own_task)
from omnic.compile.tuning.ledger import LEDGER

__all__ = ["DATA_TRANSFORM_RULE", "INVERSE_TRANSFORM_RULE", "MIN_CHANNELS", "MIN_TILES", "MIN_TUNING_S",
           "MIN_TUNING_TRIALS", "count_convs", "eligible", "rewrite_convs", "tag_fused_kernels", "tile_size",
           "transform_matrices", "transform_weight", "wanted", "winograd_conv2d_nhwc"]
#: the output tile edge used for large outputs, and the one for small ones
TILE_LARGE, TILE_SMALL = 4, 2
#: use m = 4 when the output has at least this many rows and columns, else m = 2
LARGE_TILE_MIN_EDGE = 16
#: only convolutions with at least this many output tiles (per image) use Winograd: the batched
#: GEMM reuses each transformed weight once per tile, and the weights are (m+2)^2 / 9 times
#: larger, so with few tiles the weight traffic outweighs the saved multiplications (16 is the
#: smallest count at which Winograd was measured to win; fewer were not measured)
MIN_TILES = 16
#: and only with at least this many input and output channels (the GEMMs' inner dimensions)
MIN_CHANNELS = 16

# Lavin & Gray's F(2, 3) and F(4, 3) (interpolation points 0, +-1, +-2, inf), exact fractions.
_F = Fraction
_MATRICES = {
    2: dict(
        AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
        G=[[1, 0, 0], [_F(1, 2), _F(1, 2), _F(1, 2)], [_F(1, 2), _F(-1, 2), _F(1, 2)], [0, 0, 1]],
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    ),
    4: dict(
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        G=[[_F(1, 4), 0, 0], [_F(-1, 6), _F(-1, 6), _F(-1, 6)], [_F(-1, 6), _F(1, 6), _F(-1, 6)],
           [_F(1, 24), _F(1, 12), _F(1, 6)], [_F(1, 24), _F(-1, 12), _F(1, 6)], [0, 0, 1]],
        BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
    ),
}


def transform_matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T, G, B^T)`` of F(m x m, 3 x 3) as float64 arrays (m = 2 or 4)."""
    mats = _MATRICES[m]
    return tuple(np.array([[float(v) for v in row] for row in mats[k]]) for k in ("AT", "G", "BT"))


def tile_size(out_h: int, out_w: int) -> int:
    """The output tile edge m for an ``out_h x out_w`` output."""
    return TILE_LARGE if min(out_h, out_w) >= LARGE_TILE_MIN_EDGE else TILE_SMALL


def eligible(*, kernel: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int], groups: int,
             in_channels: int, out_channels: int, out_hw: tuple[int, int], dtype: str) -> bool:
    """Whether a convolution of this shape runs as Winograd (see :data:`MIN_TILES`)."""
    if tuple(kernel) != (3, 3) or tuple(strides) != (1, 1) or tuple(dilation) != (1, 1) or groups != 1:
        return False
    if dtype != "float32" or min(in_channels, out_channels) < MIN_CHANNELS:
        return False
    m = tile_size(*out_hw)
    tiles = -(-out_hw[0] // m) * -(-out_hw[1] // m)
    return tiles >= MIN_TILES


def transform_weight(weight_ohwi: np.ndarray, m: int) -> np.ndarray:
    """``U[e, u, ci, co] = (G g G^T)[e, u]`` for OHWI weights, in float64, cast to the weight's dtype."""
    _, G, _ = transform_matrices(m)
    w = weight_ohwi.astype(np.float64)  # (co, kh, kw, ci)
    u = np.einsum("ea,oabi,ub->euio", G, w, G, optimize=True)
    return np.ascontiguousarray(u.astype(weight_ohwi.dtype))


def _sparse_bilinear(left: np.ndarray, right: np.ndarray, row: int, col: int, load, dtype: str) -> Any:
    """``sum_{a,b} left[row, a] * x[a, b] * right[col, b]`` with x = load(a, b), zeros skipped.

    Written as sum_a left[row, a] * (sum_b right[col, b] * x[a, b]) so each term is a few adds.
    """
    total = None
    for a in range(left.shape[1]):
        ca = left[row, a]
        if ca == 0:
            continue
        inner = None
        for b in range(right.shape[1]):
            cb = right[col, b]
            if cb == 0:
                continue
            inner = _axpy(inner, cb, load(a, b), dtype)
        total = _axpy(total, ca, inner, dtype)
    return total


def _axpy(acc: Any, coeff: float, x: Any, dtype: str) -> Any:
    if coeff == 1:
        term = x
    elif coeff == -1:
        return -x if acc is None else acc - x
    else:
        term = x * _const(coeff, dtype)
    return term if acc is None else acc + term


def _const(value: float, dtype: str) -> Any:
    return tvm.tirx.const(value, dtype)


def _by_position(row: Any, col: Any, exprs: list[list[Any]]) -> Any:
    """``exprs[row][col]`` for loop variables row/col: a lazy if-then-else chain.

    Once the schedule unrolls the two loops, the conditions are constants and only one
    expression is left per element; unscheduled, only the taken branch is evaluated.
    """
    def pick(index, options):
        chosen = options[-1]
        for k in range(len(options) - 2, -1, -1):
            chosen = tvm.tirx.if_then_else(index == k, options[k], chosen)
        return chosen

    return pick(row, [pick(col, line) for line in exprs])


def winograd_conv2d_nhwc(data: Any, weight_t: Any, *, padding: tuple[int, int, int, int], m: int,
                         out_dtype: str = "float32") -> Any:
    """TE compute of the convolution from NHWC ``data`` and transformed weight ``U[e, u, ci, co]``.

    Args:
        data: ``(n, h, w, ci)`` tensor.
        weight_t: ``(m+2, m+2, ci, co)`` tensor from :func:`transform_weight`.
        padding: ``(top, left, bottom, right)``.
        m: output tile edge (2 or 4).

    Returns:
        The ``(n, oh, ow, co)`` output tensor.
    """
    AT, _, BT = transform_matrices(m)
    alpha = m + 2
    n, h, w, ci = (int(v) for v in data.shape)
    co = int(weight_t.shape[3])
    top, left, bottom, right = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    n_th, n_tw = -(-out_h // m), -(-out_w // m)
    tiles = n * n_th * n_tw
    # pad to whole tiles; the extra rows/columns only feed outputs that are cut off
    need_h, need_w = (n_th - 1) * m + alpha, (n_tw - 1) * m + alpha
    padded = topi.nn.pad(data, (0, top, left, 0), (0, need_h - h - top, need_w - w - left, 0),
                         name="winograd_pad")

    def data_transform(e, u, p, c):
        img, th, tw = p // (n_th * n_tw), (p // n_tw) % n_th, p % n_tw

        def load(a, b):
            return padded[img, th * m + a, tw * m + b, c]

        exprs = [[_sparse_bilinear(BT, BT, i, j, load, str(data.dtype)) for j in range(alpha)] for i in range(alpha)]
        return _by_position(e, u, exprs)

    transformed = te.compute((alpha, alpha, tiles, ci), data_transform, name="winograd_data",
                             attrs={"schedule_rule": DATA_TRANSFORM_RULE})
    rc = te.reduce_axis((0, ci), name="rc")
    product = te.compute(
        (alpha, alpha, tiles, co),
        lambda e, u, p, o: te.sum(transformed[e, u, p, rc].astype(out_dtype) * weight_t[e, u, rc, o].astype(out_dtype),
                                  axis=rc),
        name="winograd_gemm")
    # An explicit copy of the products, which MultiLevelTiling takes as the GEMM's write cache.
    # Without it, the inverse transform (one read and one write buffer) passes for a write cache,
    # and computing it at the GEMM's tiles fails (its reads are not affine in the tile position).
    # No rule may move it on its own ("None"): inlined into the inverse it brings that failure
    # back, and RandomComputeLocation put it inside the inverse's vector loop, which TVM 0.27
    # lowers to wrong results.
    product = te.compute(product.shape, lambda e, u, p, o: product[e, u, p, o], name="winograd_gemm_out",
                         attrs={"schedule_rule": "None"})

    def inverse_transform(i, j, p, o):
        exprs = [[_sparse_bilinear(AT, AT, a, b, lambda x, y: product[x, y, p, o], out_dtype) for b in range(m)]
                 for a in range(m)]
        return _by_position(i, j, exprs)

    inverse = te.compute((m, m, tiles, co), inverse_transform, name="winograd_inverse",
                         attrs={"schedule_rule": INVERSE_TRANSFORM_RULE})
    return te.compute(
        (n, out_h, out_w, co),
        lambda b, y, x, o: inverse[y % m, x % m, b * n_th * n_tw + (y // m) * n_tw + x // m, o],
        name="conv2d_winograd")


def rewrite_convs(mod: Any) -> tuple[Any, int]:
    """Replace every eligible NHWC/OHWI ``relax.nn.conv2d`` with constant weights by Winograd.

    The weight transform runs here, in numpy; the kernel is a ``call_tir`` of
    :func:`winograd_conv2d_nhwc` marked out-elementwise-fusable, so bias, activation and residual
    adds still fuse into it. Returns ``(module, number of convolutions rewritten)``.
    """
    rewritten = [0]

    @mutator
    class _Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
                return call
            data, weight = call.args
            attrs = call.attrs
            if isinstance(weight, relax.Var):
                weight = self.lookup_binding(weight) or weight
            if (str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "OHWI"
                    or str(attrs.out_layout) not in ("NHWC", "")
                    or not (isinstance(weight, tvm.ir.expr.Constant) and hasattr(weight.value, "numpy"))):
                return call
            w = weight.value.numpy()
            shape, out_shape = data.ty.shape, call.ty.shape
            if shape is None or out_shape is None or len(shape) != 4 or str(data.ty.dtype) != "float32":
                return call
            try:
                shape, out_shape = [int(v) for v in shape], [int(v) for v in out_shape]
            except TypeError:  # symbolic shapes: not here
                return call
            if str(attrs.out_dtype) not in ("", "float32"):
                return call
            if not eligible(kernel=(w.shape[1], w.shape[2]), strides=[int(s) for s in attrs.strides],
                            dilation=[int(d) for d in attrs.dilation], groups=int(attrs.groups),
                            in_channels=shape[3], out_channels=w.shape[0], out_hw=(out_shape[1], out_shape[2]),
                            dtype=str(w.dtype)):
                return call
            m = tile_size(out_shape[1], out_shape[2])
            padding = tuple(int(v) for v in attrs.padding)
            if len(padding) == 2:
                padding = padding * 2
            top, left, bottom, right = padding

            def compute(d, u):
                return winograd_conv2d_nhwc(d, u, padding=(top, left, bottom, right), m=m)

            new = self.builder_.call_te(compute, data, relax.const(transform_weight(w, m)),
                                        primfunc_name_hint="conv2d_winograd")
            gv = new.args[0]
            # out-elementwise-fusable (kOutEWiseFusable = 4): epilogues fuse into the inverse side
            self.builder_.update_func(gv, self.builder_.get()[gv].with_attr("op_pattern", 4))
            rewritten[0] += 1
            return new

    rewriter = _Rewriter(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get()), rewritten[0]


def count_convs(mod: Any) -> int:
    """How many ``call_tir``s of the module's Relax functions run a Winograd kernel."""
    names = {gv.name_hint for gv, func in mod.functions_items()
             if isinstance(func, tvm.tirx.PrimFunc) and _has_block(func, "winograd_gemm")}
    count = [0]

    def visit(expr: Any) -> None:
        if (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir"
                and expr.args[0].name_hint in names):
            count[0] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return count[0]


def _has_block(func: Any, name: str) -> bool:
    try:
        s_tir.Schedule(func).get_sblock(name)
    except Exception:  # noqa: BLE001 - no such block (or no block structure at all)
        return False
    return True


def tag_fused_kernels(mod: Any) -> Any:
    """Give the GEMM of every fused Winograd kernel the structural hash of its whole kernel.

    omnic's tuning database keys workloads by their anchor block (the GEMM here), so kernels
    that differ only in their fused epilogue share one task and the tuned trace is replayed
    onto the others (``ApplyAnchorTrace``). That works for direct convs, but replaying a
    Winograd trace onto another epilogue fails in TVM 0.27 (mismatched instruction outputs and
    region patterns). With the hash on the anchor, each distinct kernel is its own task, and
    the same kernel in another model still finds its record.
    """
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or not _has_block(func, "winograd_gemm"):
            continue
        sch = s_tir.Schedule(func)
        mark_own_task(mod, gv, func, sch, sch.get_sblock("winograd_gemm"), WINOGRAD_KERNEL_KEY)
    return mod


#: Winograd kernels take several times longer per tuning trial than direct convs (their
#: transforms are large unrolled functions to build), so a short budget cannot reach every task,
#: and an untuned Winograd kernel is far slower than an untuned direct conv.
#: Tuning budgets below these use direct convs.
MIN_TUNING_S = 900.0
MIN_TUNING_TRIALS = 400


def wanted(deployment: Any, database_dir: Any) -> bool:
    """Whether ``engine.compile`` builds with Winograd kernels for ``deployment``.

    Yes when the tuning budget is large enough (:data:`MIN_TUNING_S` or
    :data:`MIN_TUNING_TRIALS`), or when the device's database already holds tuned Winograd
    kernels (a recompile without a budget then finds them); otherwise direct convs.
    """
    if (deployment.tuning_time_s or 0) >= MIN_TUNING_S or deployment.tuning_trials >= MIN_TUNING_TRIALS:
        return True
    ledger = Path(database_dir) / LEDGER
    try:
        tasks = json.loads(ledger.read_text()).get("tasks", {})
    except (OSError, ValueError):
        return False
    return any(int(entry.get("trials", 0) or 0) > 0 and "winograd" in str(entry.get("name", ""))
               for entry in tasks.values())
