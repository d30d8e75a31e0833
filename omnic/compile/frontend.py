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

from omnic.core.errors import CompileError, TraceError, UnsupportedOperatorError, describe
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


def _node_location(node: torch.fx.Node, op_name: str) -> str:
    """``"<op> in module '<path>' (<source line>)"`` for an error message."""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else "<top level>"
    trace_line = (node.meta.get("stack_trace") or "").strip().splitlines()
    return f"{op_name} in module {module!r}" + (f" ({trace_line[-1].strip()})" if trace_line else "")


def _unsupported_op_error(exc: Exception, ep: torch.export.ExportedProgram) -> UnsupportedOperatorError:
    text = str(exc)
    names = _unsupported_names(text)
    where = []
    for node in ep.graph.nodes:
        op_name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and any(n in (op_name, f"{op_name}.default") or op_name.startswith(
                n.split(".")[0] + ".") for n in names):
            where.append(_node_location(node, op_name))
    detail = "; ".join(where[:5]) if where else text[:500]
    return UnsupportedOperatorError(
        f"TVM's importer has no converter for {', '.join(names) or 'an operator'}: {detail}.\n"
        "  fix: replace it with a supported equivalent (e.g. AdaptiveMaxPool2d -> MaxPool2d with a fixed "
        "kernel), or run nas.adapt, which rewrites known unsupported operators")


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

    Raises:
        TraceError: ``torch.export`` cannot capture the graph.
        UnsupportedOperatorError: TVM's importer has no converter for an operator.
        CompileError: The importer failed otherwise.
    """
    if traced.source == "onnx":
        return _lower_onnx(traced)
    ep = _export(traced)
    try:
        with known_warnings_filtered():  # torch's pytree FutureWarning, once per import
            return from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    except Exception as exc:
        if "Unsupported" in str(exc):
            raise _unsupported_op_error(exc, ep) from exc
        raise CompileError(f"TVM's importer failed: {describe(exc)}") from exc
