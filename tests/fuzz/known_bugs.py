"""Miscompilations the fuzzer found, each with its minimal repro: open ones and fixed ones.

The CI sample skips models that hit an open bug (``KNOWN_BUGS``, so it stays green and keeps
looking for new bugs), and ``test_differential.py`` runs every open bug's minimal repro as
``xfail(strict=True)``: when a fix lands the repro passes, the strict xfail fails, and the entry
moves to ``FIXED_BUGS``, whose repros must pass (regression tests) and whose ops the sample draws
again.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tests.fuzz.generator import ModelSpec, Node


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnownBug:
    """A bug: which nodes hit it, why, and the smallest model that shows it."""

    name: str
    reason: str
    hits: Callable[[ModelSpec, Node], bool]
    repro: ModelSpec


def _nearest_non_integer(spec: ModelSpec, node: Node) -> bool:
    if node.op != "upsample" or dict(node.params)["mode"] != "nearest":
        return False
    _, _, h, w = spec.nodes[node.inputs[0]].shape
    _, _, oh, ow = node.shape
    return oh % h != 0 or ow % w != 0  # integer upscales agree (half-pixel rounding equals floor there)


#: Open: none at present.
KNOWN_BUGS: tuple[KnownBug, ...] = ()

#: Fixed, kept as regression repros (``reason`` says what it was and where the fix is).
FIXED_BUGS = (
    KnownBug(
        name="nearest_resize_non_integer_scale",
        reason=("fixed by omnic.compile.legalize.nearest_resize_asymmetric. TVM's ExportedProgram importer (_upsample_nearest2d) emits resize2d with "
                "coordinate_transformation_mode='half_pixel', rounding 'round'; PyTorch's 'nearest' is "
                "asymmetric + floor (src = floor(dst * in / out)). They agree only for integer upscales: "
                "13x17 -> 12x16 differs by a max relative error of 0.87"),
        hits=_nearest_non_integer,
        repro=ModelSpec(input_shape=(1, 4, 13, 17), nodes=(
            Node("input", (), (), (1, 4, 13, 17)),
            Node("upsample", (("align", False), ("mode", "nearest"), ("oh", 12), ("ow", 16)), (0,), (1, 4, 12, 16)),
        ), outputs=(1,), seed=7),
    ),
    KnownBug(
        name="multihead_attention_squeeze_negative_axis",
        reason=("fixed by omnic.compile.legalize.squeeze_axes_non_negative. nn.MultiheadAttention's packed in-projection exports as squeeze(axis=[-2]) on a 5-d "
                "tensor; TVM's ConvertLayout (run for the NHWC conv layout) dies with std::bad_alloc on a "
                "squeeze with a negative axis (squeeze(axis=[3]) passes), so compile raises CompileError "
                "'preparing the model for host failed: InternalError: std::bad_alloc'"),
        hits=lambda spec, node: node.op == "attention" and dict(node.params)["impl"] == "mha",
        repro=ModelSpec(input_shape=(1, 6, 4), nodes=(
            Node("input", (), (), (1, 6, 4)),
            Node("attention", (("d", 4), ("heads", 2), ("impl", "mha")), (0,), (1, 6, 4)),
        ), outputs=(1,), seed=0),
    ),
)


def known_bug(spec: ModelSpec, bugs: tuple[KnownBug, ...] = KNOWN_BUGS) -> KnownBug | None:
    """The first of ``bugs`` (default: the open ones) a node of ``spec`` hits, or None."""
    for bug in bugs:
        if any(bug.hits(spec, node) for node in spec.nodes[1:]):
            return bug
    return None
