"""Converters that replace TVM 0.27's ExportedProgram importer where it lowers PyTorch ops wrongly.

Each one was found by comparing built programs with PyTorch; each says what the importer gets wrong:

* ``select.int`` (``x[:, -1]``): the importer emits ``R.take(x, -1, mode="fast")``. "fast" does not
  wrap negative indices, so the program reads out of bounds: garbage, different on every run. This
  is what broke every LSTM/GRU/RNN head reading ``out[:, -1]``; the recurrent converters
  themselves are exact.
* ``index.Tensor`` (``x[:, idx]``, ``torch.take``): the same "fast" take (or ``index_tensor``) with
  index tensors that PyTorch allows to be negative.
* ``grid_sampler_2d`` (``F.grid_sample``): the importer hands PyTorch's grid, ``[N, H, W, 2]``,
  to ``R.image.grid_sample``, whose shape inference and TOPI kernel read ``[N, 2, H, W]``
  (its docstring says otherwise); the output came out ``[N, C, W, 2]``.
* ``upsample_nearest2d.vec`` with a fractional ``scale_factor`` (``F.interpolate(x,
  scale_factor=1.3)``): PyTorch picks source pixel ``floor(dst / scale)``, but the importer keeps
  only the rounded output size, and ``resize2d`` maps by ``in / out``. Sizes and whole scale
  factors are resize2d's ``in / out`` exactly; :mod:`omnic.compile.legalize` fixes their rounding.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import tvm
from tvm import relax

Converter = Callable[[fx.Node, Any], relax.Var]


def node_location(node: fx.Node, op_name: str) -> str:
    """``"<op> in module '<path>' (<source line>)"`` for an error message."""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    # torch.export names the root module "": the op sits in the model's own forward().
    where = f"in module {module!r}" if module else "in the model's top-level forward()"
    trace_line = (node.meta.get("stack_trace") or "").strip().splitlines()
    return f"{op_name} {where}" + (f" ({trace_line[-1].strip()})" if trace_line else "")


def _static_dim(importer: Any, x: relax.Expr, axis: int) -> int | None:
    """The size of ``x`` along ``axis`` when it is a compile-time constant, else None."""
    dim = importer.shape_of(x)[axis]
    return int(dim) if isinstance(dim, (int, tvm.tirx.IntImm)) else None


def _select(node: fx.Node, importer: Any) -> relax.Var:
    x = importer.env[node.args[0]]
    axis, index = node.args[1], node.args[2]
    if not isinstance(index, int) or index >= 0:
        return importer._select(node)  # non-negative: the importer is right; keep its code as it was
    ndim = len(importer.shape_of(x))
    axis = axis + ndim if axis < 0 else axis
    size = _static_dim(importer, x, axis)
    if size is None:
        # A symbolic size cannot be folded; "wrap" takes the index modulo the size, like PyTorch.
        return importer.block_builder.emit(
            relax.op.take(x, relax.const(index, "int64"), axis, mode="wrap"))
    return importer.block_builder.emit(relax.op.take(x, relax.const(index + size, "int64"), axis))


def _lifted_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> value, for the buffers and constants torch.export lifted to inputs.

    The importer sees them as parameters (bound to constants only after import), so a converter
    cannot read their values from the Relax side.
    """
    sig = ep.graph_signature
    values = {name: ep.state_dict[fqn] for name, fqn in sig.inputs_to_buffers.items() if fqn in ep.state_dict}
    values.update({name: ep.constants[key] for name, key in sig.inputs_to_lifted_tensor_constants.items()
                   if key in ep.constants})
    return values


def _wrapped_index(importer: Any, index: relax.Expr, size: Any) -> relax.Expr:
    """``index`` with negative entries moved into ``[0, size)``, as PyTorch reads them."""
    bb = importer.block_builder
    dtype = index.ty.dtype
    size_t = relax.const(size, dtype) if isinstance(size, int) else bb.emit(
        relax.op.astype(relax.op.shape_to_tensor(relax.ShapeExpr([size])), dtype))
    shifted = bb.emit(relax.op.add(index, size_t))
    return bb.emit(relax.op.where(relax.op.less(index, relax.const(0, dtype)), shifted, index))


def _index_tensor(node: fx.Node, importer: Any, constants: dict[str, torch.Tensor]) -> relax.Var:
    x = importer.env[node.args[0]]
    shape = importer.shape_of(x)
    saved = {}
    # The importer's converter reads the index tensors from importer.env; hand it the wrapped ones
    # for this node only and put the originals back for any other user of the same tensors.
    for axis, index_node in enumerate(node.args[1]):
        if not isinstance(index_node, fx.Node) or index_node in saved:
            continue
        index = importer.env[index_node]
        known = constants.get(index_node.name) if index_node.op == "placeholder" else None
        if "bool" in str(index.ty.dtype) or (known is not None and bool((known >= 0).all())):
            # A mask, or constant positions that are all non-negative (position tables, the common
            # case): the importer is right, and its code stays as it was (no extra op, same keys).
            continue
        size = _static_dim(importer, x, axis)
        saved[index_node] = index
        importer.env[index_node] = _wrapped_index(importer, index, size if size is not None else shape[axis])
    try:
        return importer._index_tensor(node)
    finally:
        importer.env.update(saved)


def _grid_sampler_2d(node: fx.Node, importer: Any) -> relax.Var:
    args = importer.retrieve_args(node)
    data, grid = args[0], args[1]
    interp = args[2] if len(args) > 2 else 0
    padding = args[3] if len(args) > 3 else 0
    align_corners = bool(args[4]) if len(args) > 4 else False
    # Every mode/padding/align_corners combination matches PyTorch once the grid is permuted
    # (tests/test_frontend_ops.py checks all 18); the codes are ATen's enums.
    method = {0: "bilinear", 1: "nearest", 2: "bicubic"}[interp]
    padding_mode = {0: "zeros", 1: "border", 2: "reflection"}[padding]
    bb = importer.block_builder
    # PyTorch's grid is [N, H_out, W_out, 2]; Relax's grid_sample reads [N, 2, H_out, W_out].
    grid = bb.emit(relax.op.permute_dims(grid, [0, 3, 1, 2]))
    return bb.emit(relax.op.image.grid_sample(
        data, grid, method=method, layout="NCHW", padding_mode=padding_mode,
        align_corners=align_corners))


def _nearest_source(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """PyTorch's nearest source index per output index for a given ``scale_factor``: in float32,
    as its CPU kernel computes it (``min(floor(dst * (1 / scale)), in - 1)``)."""
    step = np.float32(1.0) / np.float32(scale)
    index = np.floor(np.arange(out_size, dtype=np.float32) * step).astype(np.int64)
    return np.minimum(index, in_size - 1)


def _upsample_nearest2d(node: fx.Node, importer: Any) -> relax.Var:
    x = importer.env[node.args[0]]
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    scales = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
    dims = [_static_dim(importer, x, axis) for axis in (2, 3)]
    if size or not scales or None in dims:
        return importer._upsample_nearest2d(node)  # a size: in / out is PyTorch's map (legalize rounds it)
    scales = list(scales) * 2 if len(scales) == 1 else list(scales)
    outs = [int(np.floor(d * s)) for d, s in zip(dims, scales)]
    if all(float(d) / o == 1.0 / s for d, o, s in zip(dims, outs, scales)):
        return importer._upsample_nearest2d(node)  # whole scale factors: resize2d's map is exact
    # A gather per spatial axis with PyTorch's own source indices (constants: the shapes are static).
    bb = importer.block_builder
    for axis, d, o, s in zip((2, 3), dims, outs, scales):
        x = bb.emit(relax.op.take(x, relax.const(_nearest_source(d, o, s)), axis))
    return x


def converters_for(ep: torch.export.ExportedProgram) -> dict[str, Converter]:
    """The ``custom_convert_map`` for importing ``ep`` with ``from_exported_program``.

    Keys are what the importer looks converters up by: the aten overload's ``__name__`` after
    ``run_decompositions``. Lifted buffers and constants keep their placeholder names through it.
    """
    constants = _lifted_constants(ep)
    return {
        "select.int": _select,
        "index.Tensor": lambda node, importer: _index_tensor(node, importer, constants),
        "grid_sampler_2d.default": _grid_sampler_2d,
        "upsample_nearest2d.vec": _upsample_nearest2d,
    }
