"""The TVM side of the kernel-level latency predictor: what it reads from compiled code.

The fused kernels TVM emits are known at compile time: :func:`omnic.compile.pipeline.prepare`
returns the fused Relax module whose ``call_tir`` PrimFuncs are exactly the kernels the VM will
call, so the predictor never guesses fusion rules. For each PrimFunc this module reads features
from the TIR: op kind tokens from the name, FLOPs from the loop extents of the reduction block,
bytes of inputs, weights and outputs, key conv/matmul dims, and the work of each loop nest.

The feature names (:data:`FEATURES`, :data:`WORK_TERMS`) are part of the stored samples and
saved predictors: renaming or redefining one needs a new ``SCHEMA_VERSION`` in
:mod:`omnic.oracle.predictor.samples`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import tvm
from tvm import relax

from omnic.compile import frontend, pipeline
from omnic.compile.target import tvm_target
from omnic.core.deployment import Deployment

# Op-kind tokens read from PrimFunc names ("fused_conv2d3_add2_maximum1_minimum11" ->
# conv2d, add, maximum, minimum). Counted, so a longer fused epilogue has larger counts.
_TOKENS = ("conv2d", "matmul", "dense", "mean", "sum", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "softmax", "layer_norm", "gelu", "relu", "add", "subtract", "multiply", "divide", "maximum",
           "minimum", "tanh", "sigmoid", "exp", "erf", "transpose", "reshape", "broadcast_to", "take",
           "concatenate", "strided_slice", "split", "squeeze", "expand_dims", "power", "sqrt", "rsqrt",
           "clip", "where", "cast")
_KINDS = ("conv", "dwconv", "gconv", "matmul", "reduce", "pool", "softmax", "layer_norm", "injective")

#: The kernel features the predictor's regressor reads, in the order of its input columns.
FEATURES: tuple[str, ...] = (
    ("log_flops", "log_main_points", "log_total_points", "log_epilogue_points", "log_reduce_len", "log_spatial",
     "log_in_bytes", "log_weight_bytes", "log_out_bytes", "log_bytes", "arith_intensity",
     "n_blocks", "n_epilogue", "inner_spatial", "inner_reduce", "log_inner_spatial", "log_inner_reduce",
     "H", "W", "cin", "cout", "kh", "kw", "stride", "groups", "log_cin", "log_cout", "log_hw",
     "n_inputs", "n_weights")
    + tuple(f"kind_{k}" for k in _KINDS) + tuple(f"tok_{t}" for t in _TOKENS) + ("tok_other",))


def _prod(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _blocks(stmt: Any) -> list[Any]:
    """Every SBlock under ``stmt`` (root excluded), in program order."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if node is None:
            return
        kind = type(node).__name__
        if kind == "SBlockRealize":
            walk(node.block)
            return
        if kind == "SBlock":
            if node.name_hint != "root":
                found.append(node)
            walk(node.body)
            return
        if kind == "SeqStmt":
            for s in node.seq:
                walk(s)
            return
        if kind == "IfThenElse":
            walk(node.then_case)
            walk(node.else_case)
            return
        body = getattr(node, "body", None)
        if body is not None:
            walk(body)

    walk(stmt)
    return found


def _block_dims(block: Any) -> tuple[list[int], list[int]]:
    """(spatial extents, reduction extents) of a block's iteration domain."""
    spatial, reduce = [], []
    for iv in block.iter_vars:
        extent = int(iv.dom.extent)
        # IterVar.iter_type: 0 = data parallel, 2 = comm reduce
        (reduce if int(iv.iter_type) == 2 else spatial).append(extent)
    return spatial, reduce


def _name_tokens(name: str) -> dict[str, int]:
    counts = {t: 0 for t in _TOKENS}
    body = name[len("fused_"):] if name.startswith("fused_") else name
    # Names join op names (which themselves contain "_") with "_" and add numeric suffixes, so
    # match the known tokens greedily, longest first, on the digit-stripped name.
    # numeric suffixes only ("conv2d12" -> "conv2d", "add3" -> "add"); the "2" of conv2d stays
    text = re.sub(r"\d+(?=_|$)", "", body)
    for tok in sorted(_TOKENS, key=len, reverse=True):
        pattern = rf"(?:^|_){re.escape(tok)}(?=_|$)"
        n = len(re.findall(pattern, text))
        if n:
            counts[tok] += n
            text = re.sub(pattern, "_", text)
    other = len([p for p in text.split("_") if p])
    counts_out = {f"tok_{t}": c for t, c in counts.items()}
    counts_out["tok_other"] = other
    return counts_out


def _buffer_bytes(buf: Any) -> int:
    dtype = str(buf.dtype)
    bits = int(re.sub(r"\D", "", dtype) or 32)
    return _prod(int(d) for d in buf.shape) * max(1, bits // 8)


def primfunc_features(name: str, func: Any) -> dict[str, float]:
    """Features of one fused kernel (a TIR PrimFunc of the prepared module).

    FLOPs: 2 x the iteration points of the main reduction block (one multiply-add per point) for
    conv2d / matmul kernels, else one per iteration point of every block.

    Args:
        name: The PrimFunc's global name (op kinds are read from it).
        func: The ``tvm.tirx.PrimFunc``.

    Returns:
        A dict over :data:`FEATURES`.
    """
    blocks = _blocks(func.body)
    dims = [_block_dims(b) for b in blocks]
    points = [_prod(s) * _prod(r) for s, r in dims]
    total_points = sum(points) or 1
    reducing = [i for i, (_, r) in enumerate(dims) if r]
    main = max(reducing, key=lambda i: points[i]) if reducing else (max(range(len(points)), key=points.__getitem__)
                                                                     if points else None)
    spatial, reduce = dims[main] if main is not None else ([1], [])
    main_points = points[main] if main is not None else 1
    main_name = blocks[main].name_hint if main is not None else ""

    attrs = func.attrs
    weight_idx = {int(i) for i in (attrs.get("layout_free_buffers", []) if attrs is not None else [])}
    # 0.27 PrimFuncs take Buffers as params (older TVM: Vars plus a buffer_map)
    bmap = getattr(func, "buffer_map", None)
    buffers = [bmap[p] if bmap is not None and p in bmap else p for p in func.params]
    buffers = [b for b in buffers if hasattr(b, "shape")]
    out_buf = buffers[-1] if buffers else None
    ins = [b for i, b in enumerate(buffers[:-1]) if i not in weight_idx]
    weights = [b for i, b in enumerate(buffers[:-1]) if i in weight_idx]
    in_bytes = sum(_buffer_bytes(b) for b in ins)
    weight_bytes = sum(_buffer_bytes(b) for b in weights)
    out_bytes = _buffer_bytes(out_buf) if out_buf is not None else 0

    toks = _name_tokens(name)
    is_conv = "conv2d" in main_name or toks["tok_conv2d"] > 0
    is_matmul = "matmul" in main_name or toks["tok_matmul"] > 0 or toks["tok_dense"] > 0
    H = W = cin = cout = kh = kw = stride = groups = 0
    kind = "injective"
    if is_conv and weights and ins and len(weights[0].shape) == 4 and len(ins[0].shape) == 4:
        # prepare() lays convs out as NHWC data / OHWI weights (CPU); the output is NHWC.
        wshape = [int(d) for d in weights[0].shape]
        ishape = [int(d) for d in ins[0].shape]
        oshape = [int(d) for d in out_buf.shape] if out_buf is not None and len(out_buf.shape) == 4 else None
        cout, kh, kw, cin_g = wshape
        cin = ishape[3]
        groups = max(1, cin // max(1, cin_g))
        if oshape is not None:
            H, W = oshape[1], oshape[2]
            stride = max(1, round(ishape[1] / max(1, oshape[1])))
        kind = "dwconv" if groups > 1 and groups == cin else ("gconv" if groups > 1 else "conv")
    elif is_conv:
        kind = "conv"
    elif is_matmul:
        kind = "matmul"
        if reduce:
            cin = _prod(reduce)
        cout = spatial[-1] if spatial else 0
        H = _prod(spatial[:-1]) if len(spatial) > 1 else 1
    elif toks["tok_softmax"]:
        kind = "softmax"
    elif toks["tok_layer_norm"]:
        kind = "layer_norm"
    elif toks["tok_max_pool2d"] or toks["tok_avg_pool2d"] or toks["tok_adaptive_avg_pool2d"]:
        kind = "pool"
    elif reducing:
        kind = "reduce"

    if kind in ("conv", "dwconv", "gconv", "matmul"):
        flops = 2.0 * main_points  # one multiply-add per point of the reduction block
    else:
        flops = float(total_points)
    all_bytes = in_bytes + weight_bytes + out_bytes

    def lg(v: float) -> float:
        return math.log2(1.0 + float(v))

    feats: dict[str, float] = {
        "log_flops": lg(flops), "log_main_points": lg(main_points), "log_total_points": lg(total_points),
        "log_epilogue_points": lg(total_points - main_points),
        "log_reduce_len": lg(_prod(reduce)), "log_spatial": lg(_prod(spatial)),
        "log_in_bytes": lg(in_bytes), "log_weight_bytes": lg(weight_bytes), "log_out_bytes": lg(out_bytes),
        "log_bytes": lg(all_bytes), "arith_intensity": flops / max(1, all_bytes),
        "n_blocks": len(blocks), "n_epilogue": max(0, len(blocks) - 1 - (1 if "pad" in " ".join(
            b.name_hint for b in blocks) else 0)),
        "inner_spatial": spatial[-1] if spatial else 1, "inner_reduce": reduce[-1] if reduce else 0,
        "log_inner_spatial": lg(spatial[-1] if spatial else 1), "log_inner_reduce": lg(reduce[-1] if reduce else 0),
        "H": H, "W": W, "cin": cin, "cout": cout, "kh": kh, "kw": kw, "stride": stride, "groups": groups,
        "log_cin": lg(cin), "log_cout": lg(cout), "log_hw": lg(H * W),
        "n_inputs": len(ins), "n_weights": len(weights),
        "flops": flops,  # raw, for reports (not a model feature)
    }
    feats.update(_loop_terms(dims))
    for k in _KINDS:
        feats[f"kind_{k}"] = 1.0 if kind == k else 0.0
    feats.update({k: float(v) for k, v in toks.items()})
    feats["kind"] = kind  # type: ignore[assignment]  # for reports
    return feats


#: The work terms of an unscheduled kernel (:func:`_loop_terms`): the linear base model's inputs.
WORK_TERMS = ("w_reduce_points", "w_reduce_entries", "w_short_reduce_points", "w_spatial_points",
              "w_spatial_entries", "w_blocks", "w_call")


def _loop_terms(dims: Sequence[tuple[list[int], list[int]]]) -> dict[str, float]:
    """How much work each kind of loop of an unscheduled kernel does.

    Untuned kernels are the loop nests TVM's lowering writes, one per block, its iteration
    variables in order (spatial, then reduction), run on one core: their time is close to
    linear in the iterations of the innermost statement (a scalar multiply-add in a reduction, a
    vectorisable store in an elementwise block) and in the entries of the innermost loop (loop
    overhead, accumulator init). A reduction whose innermost loop is short (a depthwise conv's
    kernel row, 3-7 iterations) pays its overhead per few points, so it has a term of its own.
    A linear model over these terms extrapolates to kernels larger than any it was fitted on,
    where trees would stay flat.
    """
    terms = dict.fromkeys(WORK_TERMS, 0.0)
    for spatial, reduce in dims:
        points = float(_prod(spatial) * _prod(reduce))
        if reduce:
            inner = max(1, reduce[-1])
            terms["w_short_reduce_points" if inner < 8 else "w_reduce_points"] += points
            terms["w_reduce_entries"] += points / inner
        else:
            inner = max(1, spatial[-1] if spatial else 1)
            terms["w_spatial_points"] += points
            terms["w_spatial_entries"] += points / inner
    terms["w_blocks"] = float(len(dims))
    terms["w_call"] = 1.0
    return terms


def kernel_features(prepared: Any) -> list[dict[str, Any]]:
    """The kernels of a prepared (fused) module: name, call count and features.

    Args:
        prepared: The module :func:`omnic.compile.pipeline.prepare` returns.

    Returns:
        One dict per distinct PrimFunc that ``main`` calls: ``{"name", "calls", "features"}``.
    """
    calls: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            gv = expr.args[0]
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + 1

    for gv, func in prepared.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    out = []
    for gv, func in prepared.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint in calls:
            out.append({"name": gv.name_hint, "calls": calls[gv.name_hint],
                        "features": primfunc_features(gv.name_hint, func)})
    out.sort(key=lambda k: k["name"])
    return out


def prepare(traced: Any, deployment: Deployment) -> tuple[Any, Any, Any]:
    """``(prepared module, device spec, TVM target)``: the fused module whose kernels are predicted.

    The same lowering and preparation ``engine.compile`` runs, stopping before the LLVM build.
    """
    spec = deployment.spec
    target = tvm_target(spec, num_threads=deployment.threads)
    return pipeline.prepare(frontend.lower(traced), spec, target, deployment.precision), spec, target


def load_library(path: str | Path) -> Any:
    """A compiled library saved with ``export_library`` (a sample's, measured again without a rebuild)."""
    return tvm.runtime.load_module(str(path))
