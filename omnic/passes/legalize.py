"""Legalisation: rewrite operators a device cannot run at all, or name them in an error.

Which operators that are comes from the device's ``unsupported_ops`` field of its
:class:`~omnic.core.targets.DeviceSpec` plus :data:`TVM_UNSUPPORTED` (gaps of TVM's importers,
the same on every device), never from the device's name.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F

from omnic.core.errors import UnsupportedOperatorError
from omnic.core.targets import DeviceSpec
from omnic.passes.base import PassReport, copy_graph_module, finish, module_of, op_name, pair, replace_node, shape_of

#: Operators TVM's importers cannot take on any device, with why. TVM's PyTorch importers (fx
#: and ExportedProgram) have no converter for them, so such a graph fails to import at all.
TVM_UNSUPPORTED: Mapping[str, str] = {
    "adaptive_max_pool2d": "TVM's fx and ExportedProgram importers have no converter for it",
}


def legalize_unsupported(gm: fx.GraphModule, spec: DeviceSpec) -> tuple[fx.GraphModule, PassReport]:
    """Rewrite operators the device cannot run at all; name the ones no rewrite covers.

    ``AdaptiveMaxPool2d`` (no TVM converter) becomes ``amax`` over H, W for a 1x1 output, or
    ``MaxPool2d`` with a fixed kernel when the input size is a multiple of the output size (both
    exact). Anything else listed in :data:`TVM_UNSUPPORTED` or the device's ``unsupported_ops``
    raises :class:`~omnic.core.errors.UnsupportedOperatorError` naming the node, its shape and a fix.

    Raises:
        UnsupportedOperatorError: An unsupported operator with no exact rewrite here.
    """
    gm = copy_graph_module(gm)
    unsupported = {**TVM_UNSUPPORTED, **dict(spec.unsupported_ops)}
    changed: list[str] = []
    for node in list(gm.graph.nodes):
        name = op_name(gm, node)
        if name not in unsupported:
            continue
        x = node.args[0] if node.args else None
        shape = shape_of(x)
        if name == "adaptive_max_pool2d" and shape is not None and len(shape) >= 3:
            if node.op == "call_module":
                mod = module_of(gm, node)
                out_size, with_indices = mod.output_size, mod.return_indices
            else:
                out_size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
                with_indices = node.kwargs.get("return_indices", node.args[2] if len(node.args) > 2 else False)
            h, w = shape[-2:]
            oh, ow = pair(out_size)
            oh, ow = oh or h, ow or w
            if not with_indices and (h % oh == 0 and w % ow == 0):
                with gm.graph.inserting_after(node):
                    if (oh, ow) == (1, 1):
                        new = gm.graph.call_function(torch.amax, (x,), {"dim": (-2, -1), "keepdim": True})
                    else:
                        kernel = (h // oh, w // ow)
                        new = gm.graph.call_function(F.max_pool2d, (x, kernel, kernel))
                replace_node(gm, node, new, changed)
                continue
            raise UnsupportedOperatorError(
                f"node {node.name!r} ({name}, input {h}x{w} -> output {oh}x{ow}) cannot run on "
                f"{spec.name}: {unsupported[name]}; it has no exact fixed-kernel rewrite because "
                f"{h}x{w} is not a multiple of {oh}x{ow}" + (" (or it returns indices)" if with_indices else "") +
                ".\n  fix: choose an input size that is a multiple of the output size, or use "
                "MaxPool2d / torch.amax in the model")
        raise UnsupportedOperatorError(
            f"node {node.name!r} ({name}) cannot run on {spec.name}: {unsupported[name]}; omnic has "
            "no rewrite for it.\n  fix: replace it in the model with a supported equivalent")
    return finish(gm, "legalize_unsupported", changed, exact=True,
                  why=f"operators {spec.name} cannot run at all: {', '.join(sorted(unsupported))}")
