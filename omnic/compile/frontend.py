"""Lowering: a traced model (torch.export, fx or ONNX) -> a Relax ``IRModule`` with its weights bound.

Importer failures become omnic errors that name the operator, the module it sits in and the fix.
"""
from __future__ import annotations

import re

import onnx
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.torch import from_exported_program

from omnic.compile.converters import converters_for, node_location
from omnic.core.errors import CompileError, OmnicError, TraceError, UnsupportedOperatorError, describe
from omnic.core.ir import TracedModel, fused_graph
from omnic.core.quiet import known_warnings_filtered


def _export(traced: TracedModel) -> torch.export.ExportedProgram:
    if traced.exported is not None:
        return traced.exported
    try:
        return torch.export.export(fused_graph(traced.gm), traced.example_inputs, strict=False)
    except Exception as exc:
        raise TraceError(
            f"torch.export could not capture the traced graph: {describe(exc)}\n"
            "  fix: remove data-dependent shapes or Python side effects from forward()") from exc


def _unsupported_names(text: str) -> list[str]:
    """The operator names TVM's "Unsupported function types [...]" message lists."""
    if "Unsupported" not in text:
        return []
    return re.findall(r"'([\w.]+)'", text.split("Unsupported function types", 1)[-1])


# Workarounds for ops TVM 0.27 has no converter for, by the op's name without its overload.
_WORKAROUNDS = {
    "grid_sampler_3d": "sample each depth slice with 2-D grid_sample (its 2-D form is supported), "
                       "or run the sampling outside the compiled model",
}
_GENERIC_WORKAROUND = ("replace it with a supported equivalent (e.g. AdaptiveMaxPool2d -> MaxPool2d with a "
                       "fixed kernel), or run nas.adapt, which rewrites known unsupported operators")


def _unsupported_op_error(exc: Exception, ep: torch.export.ExportedProgram) -> UnsupportedOperatorError:
    text = str(exc)
    names = _unsupported_names(text)
    where = []
    try:
        # The importer names ops after its own run_decompositions (grid_sampler -> grid_sampler_3d):
        # look for them in that graph, as it saw it; decomposing again costs only on this error path.
        graphs = [ep.run_decompositions().graph, ep.graph]
    except Exception:
        graphs = [ep.graph]
    for graph in graphs:
        for node in graph.nodes:
            op_name = getattr(node.target, "__name__", str(node.target))
            if node.op == "call_function" and any(n in (op_name, f"{op_name}.default") or op_name.startswith(
                    n.split(".")[0] + ".") for n in names):
                where.append(node_location(node, op_name))
        if where:
            break
    detail = "; ".join(where[:5]) if where else text[:500]
    fixes = [_WORKAROUNDS[n.split(".")[0]] for n in names if n.split(".")[0] in _WORKAROUNDS]
    return UnsupportedOperatorError(
        f"TVM's importer has no converter for {', '.join(names) or 'an operator'}: {detail}.\n"
        f"  fix: {'; '.join(fixes) or _GENERIC_WORKAROUND}")


def _lower_onnx(traced: TracedModel) -> tvm.IRModule:
    shape_dict = {n: list(t.shape) for n, t in zip(traced.input_names, traced.example_inputs)}
    try:
        mod = from_onnx(onnx.load(traced.onnx_path), shape_dict=shape_dict, dtype_dict="float32")
    except Exception as exc:
        raise UnsupportedOperatorError(
            f"TVM could not import ONNX model {traced.onnx_path}: {describe(exc, 500)}") from exc
    mod, params = relax.frontend.detach_params(mod)
    if params.get("main"):
        names = [v.name for v in mod["main"].params[len(traced.example_inputs):]]
        mod = relax.transform.BindParams("main", dict(zip(names, params["main"])))(mod)
    return mod


def lower(traced: TracedModel) -> tvm.IRModule:
    """Import the traced model into a Relax ``IRModule`` with the weights as constants.

    PyTorch models go through ``torch.export`` and TVM's ExportedProgram importer: its fx
    importer mishandles eval-mode BatchNorm and nearest-neighbour interpolation without an error.
    Where the ExportedProgram importer itself lowers an op wrongly (negative indices, grid_sample),
    :func:`omnic.compile.converters.converters_for` replaces its converter or refuses the op.

    Raises:
        TraceError: ``torch.export`` cannot capture the graph.
        UnsupportedOperatorError: TVM's importer has no converter for an operator, or one of
            ours refuses an op it would lower wrongly.
        CompileError: The importer failed otherwise.
    """
    if traced.source == "onnx":
        return _lower_onnx(traced)
    ep = _export(traced)
    try:
        with known_warnings_filtered():  # torch's pytree FutureWarning, once per import
            return from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                                         custom_convert_map=converters_for(ep))
    except OmnicError:
        raise  # a converter of ours refused an op: already typed, naming the op and the fix
    except Exception as exc:
        if "Unsupported" in str(exc):
            raise _unsupported_op_error(exc, ep) from exc
        raise CompileError(f"TVM's importer failed: {describe(exc)}") from exc
