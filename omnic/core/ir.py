"""Tracing into omnic's IR: a ``torch.fx.GraphModule`` with shapes recorded, plus a structural hash.

Accepted inputs: an ``nn.Module`` with example inputs, an ``fx.GraphModule``, a
``torch.export.ExportedProgram`` or a path to an ``.onnx`` file.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.shape_prop import ShapeProp

from omnic.core.errors import InputShapeError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OMNIC_DIR = os.path.dirname(__file__)


@dataclass(frozen=True, kw_only=True)
class TracedModel:
    """A traced model, ready to lower or to rewrite.

    Attributes:
        gm: The fx graph (with ``node.meta["tensor_meta"]`` filled in); None for ONNX inputs.
        example_inputs: The inputs shapes were recorded with (a tuple of tensors).
        structural_hash: Hex digest; equal for the same architecture and input shapes,
            independent of weight values and module names.
        source: ``"module"``, ``"graph_module"``, ``"exported_program"`` or ``"onnx"``.
        exported: The ExportedProgram when the user handed one in.
        onnx_path: The ONNX file when the user handed one in.
        output_is_tuple: Whether the model returns a tuple/list of tensors.
    """

    gm: fx.GraphModule | None
    example_inputs: tuple[torch.Tensor, ...]
    structural_hash: str
    source: str
    exported: Any = None
    onnx_path: str | None = None
    output_is_tuple: bool = False
    input_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.example_inputs]

    @property
    def input_dtypes(self) -> list[str]:
        return [str(t.dtype).replace("torch.", "") for t in self.example_inputs]


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalise ``example_inputs`` (a tensor, an array, or a tuple/list of them) to a tuple of tensors."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        items = tuple(example_inputs)
    else:
        items = (example_inputs,)
    out = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append(item.detach())
        elif hasattr(item, "__array__"):
            out.append(torch.as_tensor(item))
        else:
            raise InputShapeError(
                f"example inputs must be tensors or numpy arrays, got {type(item).__name__}; "
                "pass a tensor or a tuple of tensors")
    return tuple(out)


class _PathTracer(fx.Tracer):
    """An fx tracer that remembers which module it is inside, for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.omnic_scope: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m) if m is not self.root else ""
        self.omnic_scope.append(f"{name} ({type(m).__name__})" if name else type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see the error
                self.failed_in = self.omnic_scope[-1]
            raise
        finally:
            self.omnic_scope.pop()


def _user_frame(exc: BaseException) -> str | None:
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith(_TORCH_DIR) and not fr.filename.startswith(_OMNIC_DIR):
            return f"{fr.filename}:{fr.lineno}: {fr.line}"
    return None


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` symbolic trace with an error that names the module, the line and the fix.

    Raises:
        TraceError: The model has data-dependent control flow or another untraceable construct.
    """
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        where = tracer.failed_in or type(model).__name__
        line = _user_frame(exc)
        hint = ("Rewrite data-dependent Python control flow (`if x.sum() > 0`, loops over tensor "
                "values) with tensor ops such as torch.where, move it out of forward(), or pass a "
                "torch.export.ExportedProgram or an .onnx file instead.")
        msg = f"cannot trace module {where}: {type(exc).__name__}: {exc}"
        if line:
            msg += f"\n  at {line}"
        raise TraceError(f"{msg}\n  fix: {hint}") from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _module_signature(mod: nn.Module) -> str:
    params = ",".join(f"{n}:{tuple(p.shape)}" for n, p in mod.named_parameters(recurse=False))
    bufs = ",".join(f"{n}:{tuple(b.shape)}" for n, b in mod.named_buffers(recurse=False))
    return f"{type(mod).__module__}.{type(mod).__qualname__}({mod.extra_repr()})[{params}|{bufs}]"


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def graph_signature(gm: fx.GraphModule) -> str:
    """A canonical text of the graph: ops, module hyper-parameters and tensor shapes, with node
    names replaced by positions, so weight values and module names do not change it."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def fmt(arg: Any) -> str:
        if isinstance(arg, fx.Node):
            return f"%{index[arg]}"
        if isinstance(arg, (tuple, list)):
            return "(" + ",".join(fmt(a) for a in arg) + ")"
        if isinstance(arg, dict):
            return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in sorted(arg.items())) + "}"
        if isinstance(arg, (torch.dtype, torch.device, torch.memory_format)):
            return str(arg)
        return repr(arg)

    lines = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = ""
        if meta is not None and hasattr(meta, "shape"):
            shape = f"{tuple(meta.shape)}:{meta.dtype}"
        if node.op == "call_module":
            what = _module_signature(gm.get_submodule(node.target))
        elif node.op == "get_attr":
            try:
                attr = gm
                for part in str(node.target).split("."):
                    attr = getattr(attr, part)
                what = f"attr{tuple(attr.shape)}" if isinstance(attr, torch.Tensor) else type(attr).__name__
            except AttributeError:
                what = "attr?"
        elif node.op in ("placeholder", "output"):
            what = node.op
        else:
            what = _target_name(node.target)
        lines.append(f"{node.op}|{what}|{fmt(node.args)}|{fmt(node.kwargs)}|{shape}")
    return "\n".join(lines)


def structural_hash_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class _TrackingShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when the model fails."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        # ShapeProp prints the whole traceback of a failing node to stderr before it re-raises;
        # the InputShapeError says it in three lines. What a node that succeeds prints is kept.
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            result = super().run_node(n)
        if buf.getvalue():
            sys.stderr.write(buf.getvalue())
        return result


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: ShapeProp wraps the real error in a RuntimeError whose
    text is a dump of the fx node."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _model_float_dtype(gm: nn.Module) -> torch.dtype | None:
    for p in list(gm.parameters()) + list(gm.buffers()):
        if p.is_floating_point():
            return p.dtype
    return None


def _first_layer(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> tuple[int, str, nn.Module] | None:
    """``(input index, module name, module)`` of the first conv or linear layer in execution order
    when it reads a model input directly (its weight says what that input must look like)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            arg = node.args[0] if node.args else None
            if arg in placeholders and placeholders.index(arg) < len(inputs):
                return placeholders.index(arg), str(node.target), mod
            return None
    return None


def _input_mismatch(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """The likely cause of a failed run on ``inputs`` in one line, from the model's weights: a
    dtype that is not the weights', a rank or channel count the first layer cannot take."""
    want = _model_float_dtype(gm)
    first = _first_layer(gm, inputs)
    if want is not None:
        model_dtype = str(want).replace("torch.", "")
        for i, t in enumerate(inputs):
            # an integer input may be token ids for an embedding: only one a conv or linear layer
            # reads directly is a dtype mistake
            if t.dtype != want and (t.is_floating_point() or (first is not None and first[0] == i)):
                got = str(t.dtype).replace("torch.", "")
                return (f"{got} input, model is {model_dtype}: pass x.to(torch.{model_dtype}) "
                        f"(input {i}; omnic does not cast inputs silently)")
    if first is None:
        return None
    i, name, mod = first
    shape = tuple(inputs[i].shape)
    if isinstance(mod, nn.Linear):
        if not shape or shape[-1] != mod.in_features:
            got = shape[-1] if shape else "a scalar"
            return (f"expected {mod.in_features} input features in the last dimension, got {got} "
                    f"(input {i} has shape {shape}; the first layer {name!r} is {mod})")
        return None
    dims = len(mod.kernel_size)
    if len(shape) not in (dims + 1, dims + 2):
        layout = "(N, C, " + ", ".join("DHW"[3 - dims:]) + ")"
        return (f"expected a {dims + 2}-d input {layout}, got {len(shape)}-d shape {shape} "
                f"(the first layer {name!r} is a {type(mod).__name__})")
    channels = mod.weight.shape[1] * mod.groups
    got = shape[1] if len(shape) == dims + 2 else shape[0]
    if got != channels:
        return (f"expected {channels} input channels, got {got} (input {i} has shape {shape}; the first "
                f"layer {name!r} has in_channels={channels})")
    return None


def explain_input_error(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], exc: BaseException,
                        node: fx.Node | None = None) -> InputShapeError:
    """The :class:`InputShapeError` for a model that failed on its example inputs: the cause in
    one line first, then torch's own message (its first line) and where it was raised.

    Args:
        gm: The traced model.
        inputs: The example inputs it failed on.
        exc: What running it raised.
        node: The fx node that was running, when known.
    """
    root = _root_cause(exc)
    detail = (str(root).strip().splitlines() or [""])[0][:300]
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
    cause = _input_mismatch(gm, inputs)
    head = cause or f"the model fails on example inputs {shapes}"
    where = ""
    if node is not None:
        where = f" at node {node.name!r}" + (f" (module {node.target!r})" if node.op == "call_module" else "")
    line = _user_frame(root)
    return InputShapeError(
        f"{head}\n  torch: {type(root).__name__}: {detail}{where}" + (f"\n  at {line}" if line else "") +
        f"\n  fix: pass example inputs shaped and typed like one real batch (got {shapes})")


def _record_shapes(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> Any:
    prop = _TrackingShapeProp(gm)
    try:
        with torch.no_grad():
            return prop.propagate(*inputs)
    except Exception as exc:
        raise explain_input_error(gm, inputs, exc, prop.current) from exc


def fused_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with each conv+BN pair folded into one conv, as lowering exports it.

    Folding is exact and spares TVM's constant folding a compiled function per folded weight;
    calibration observes the same graph, so its weights match the lowered constants. Where fx's
    fuser cannot handle the graph, ``gm`` itself is returned (the fold is an optimisation).
    """
    try:
        return fuse(gm, inplace=False)
    except Exception:  # noqa: BLE001 - fuse raises whatever the module's code raises
        return gm


def resolve_example_inputs(example_inputs: Any, deployment: Any = None) -> tuple[torch.Tensor, ...]:
    """Apply ``deployment.input_shape`` / ``deployment.batch`` to the example inputs."""
    inputs = as_input_tuple(example_inputs)
    if deployment is None:
        return inputs
    if deployment.input_shape is not None:
        dtype = inputs[0].dtype if inputs else torch.float32
        first = torch.randn(deployment.input_shape).to(dtype)
        inputs = (first,) + inputs[1:]
    if deployment.batch is not None:
        inputs = tuple(t[:1].expand(deployment.batch, *t.shape[1:]).contiguous() if t.dim() else t
                       for t in inputs)
    return inputs


def trace(model: Any, example_inputs: Any = None) -> TracedModel:
    """Trace ``model`` into omnic's IR.

    Args:
        model: An ``nn.Module``, an ``fx.GraphModule``, a ``torch.export.ExportedProgram``, a
            path to an ``.onnx`` file, or an already traced :class:`TracedModel`.
        example_inputs: A tensor or a tuple of tensors (required except for ExportedProgram,
            whose example inputs are reused, and ONNX files with static input shapes).

    Returns:
        The traced model with shapes and a structural hash.

    Raises:
        TraceError: The model cannot be traced (the message names module, line and fix).
        InputShapeError: Missing or mismatching example inputs.
    """
    if isinstance(model, TracedModel):
        if example_inputs is None:
            return model
        model = model.gm if model.gm is not None else model.onnx_path
    if isinstance(model, (str, Path)):
        return _trace_onnx(str(model), example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        return _trace_exported(model, example_inputs)
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"cannot trace a {type(model).__name__}: pass an nn.Module, an fx.GraphModule, a "
            "torch.export.ExportedProgram or a path to an .onnx file")
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        raise InputShapeError(
            "example_inputs are required to trace an nn.Module: pass a tensor (or a tuple of "
            "tensors) shaped like one real input batch, e.g. torch.randn(1, 3, 224, 224)")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, fx.GraphModule):
            gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
            source = "graph_module"
        else:
            gm = symbolic_trace(model)
            source = "module"
        gm.eval()
        out = _record_shapes(gm, inputs)
    finally:
        model.train(was_training)
    return TracedModel(gm=gm, example_inputs=inputs,
                       structural_hash=structural_hash_of(graph_signature(gm)), source=source,
                       output_is_tuple=isinstance(out, (tuple, list)),
                       input_names=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"))


def _trace_exported(ep: torch.export.ExportedProgram, example_inputs: Any) -> TracedModel:
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        args = ep.example_inputs[0] if ep.example_inputs else ()
        inputs = as_input_tuple(args)
    if not inputs:
        raise InputShapeError("this ExportedProgram carries no example inputs: pass example_inputs")
    gm = ep.module()
    out = _record_shapes(gm, inputs)
    return TracedModel(gm=gm, example_inputs=inputs, exported=ep,
                       structural_hash=structural_hash_of(graph_signature(gm)),
                       source="exported_program", output_is_tuple=isinstance(out, (tuple, list)),
                       input_names=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"))


def _trace_onnx(path: str, example_inputs: Any) -> TracedModel:
    import onnx

    if not os.path.exists(path):
        raise TraceError(f"ONNX file {path!r} does not exist")
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise TraceError(f"cannot read ONNX file {path!r}: {exc}") from exc
    init_names = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        shapes = []
        for gi in graph_inputs:
            dims = [d.dim_value for d in gi.type.tensor_type.shape.dim]
            if any(d <= 0 for d in dims):
                raise InputShapeError(
                    f"ONNX input {gi.name!r} has a dynamic shape; pass example_inputs (or --input-shape)")
            shapes.append(dims)
        inputs = tuple(torch.randn(*s) for s in shapes)
    if len(inputs) != len(graph_inputs):
        raise InputShapeError(f"the ONNX model has {len(graph_inputs)} inputs, got {len(inputs)} example inputs")
    parts = [f"in:{tuple(t.shape)}:{t.dtype}" for t in inputs]
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        attrs = ",".join(f"{a.name}={onnx.helper.get_attribute_value(a)!r}" for a in node.attribute)
        ins = ",".join(str(shapes.get(i, "v")) for i in node.input)
        parts.append(f"{node.domain}:{node.op_type}({attrs})[{ins}]->{len(node.output)}")
    return TracedModel(gm=None, example_inputs=inputs, structural_hash=structural_hash_of("\n".join(parts)),
                       source="onnx", onnx_path=os.path.abspath(path),
                       output_is_tuple=len(model.graph.output) > 1,
                       input_names=tuple(gi.name for gi in graph_inputs))
