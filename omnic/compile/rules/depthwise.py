"""Schedule rule for NHWC depthwise convolutions and their fused epilogue (CPU, fp32).

:func:`tag_depthwise_kernels` marks the depthwise conv of every fused kernel when a module is
prepared; :func:`schedule_depthwise` gives it a space of register-tiled schedules with the
padding and the epilogue fused. MetaSchedule's generic tiling keeps the conv's output tile in
memory, often materialises the padded input as a separate pass over the whole tensor, and leaves
the epilogue unvectorised, so depthwise convs ran far below the speed of the 1x1 convs beside
them (``benchmarks/README.md`` has the measurements).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV

from omnic.compile.rules.marking import DEPTHWISE_KERNEL_KEY, DEPTHWISE_RULE, mark_own_task
from omnic.compile.rules.utils import REDUCTION, SPATIAL, applied_variants, extent, iter_kinds, lanes_for

#: output-width tiles tried (each a row of accumulators held in vector registers)
DEPTHWISE_WIDTH_TILES = (4, 7, 8, 14)


def tag_depthwise_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark the depthwise conv of every fused NHWC kernel for :func:`schedule_depthwise`.

    A block is depthwise when it is a 7-loop conv (n, h, w, c spatial; ry, rx, rc reduction)
    whose channel reduction has extent 1. The mark also carries the structural hash of the
    whole kernel: the tuned schedule places the fused epilogue, so it is not replayable onto
    another epilogue and each distinct kernel must be its own task (as with Winograd).
    """
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            sch = s_tir.Schedule(func)
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
        except Exception:  # noqa: BLE001 - no block structure: nothing to tag
            continue
        conv = next((b for b in blocks if _is_depthwise_nhwc(sch, b)), None)
        if conv is None:
            continue
        sch.annotate(conv, "schedule_rule", DEPTHWISE_RULE)
        mark_own_task(mod, gv, func, sch, conv, DEPTHWISE_KERNEL_KEY)
    return mod


def _is_depthwise_nhwc(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    stmt = sch.get(block)
    if not stmt.name_hint.startswith(("group_conv2d_nhwc", "depthwise_conv2d_nhwc")):
        return False
    if iter_kinds(sch, block) != [SPATIAL] * 4 + [REDUCTION] * 3:
        return False
    rc, channels = stmt.iter_vars[6].dom.extent, stmt.iter_vars[3].dom.extent
    # channels in vector lanes of at least 4 (else the generic rules schedule it)
    return (hasattr(rc, "value") and int(rc.value) == 1 and hasattr(channels, "value")
            and int(channels.value) % 4 == 0 and str(stmt.writes[0].source.dtype) == "float32")


def schedule_depthwise(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """Design space of one NHWC depthwise conv and its fused epilogue.

    Each output row is cut into tiles of ``w`` pixels x 16 channels held in vector registers;
    the 3x3 window is unrolled over them (one weight vector reused across the tile), the padding
    is read in place or copied per tile, and bias, activation and residual are applied to the
    tile before it is stored once. Variants: tile width, padding placement, channel groups
    inside or outside the width tiles, 16 or 8 lanes.
    """
    loops = sch.get_loops(block)
    width = extent(sch, loops[2]) if len(loops) == 7 else None
    return applied_variants(sch, block, _apply_depthwise, _settings(width or 0)) or [sch]


def _settings(width: int) -> Iterator[dict[str, Any]]:
    """The variants of the design space, in the order the tuner sees them."""
    for pad_mode in ("inline", "tile"):
        for width_tile in _width_tiles(width):
            for channels_outer in (False, True):
                for lanes_cap in (16, 8):
                    if lanes_cap == 8 and (pad_mode != "inline" or channels_outer):
                        continue
                    yield {"pad_mode": pad_mode, "width_tile": width_tile, "channels_outer": channels_outer,
                           "lanes_cap": lanes_cap}


def _width_tiles(width: int) -> tuple[int, ...]:
    """Tile widths for an output row of ``width``: those of :data:`DEPTHWISE_WIDTH_TILES` that
    divide it, else its divisors up to 16, else 8 (the last tile then runs predicated)."""
    tiles = tuple(t for t in DEPTHWISE_WIDTH_TILES if width % t == 0)
    tiles = tiles or tuple(t for t in range(16, 1, -1) if width % t == 0)[:3]
    return tiles or (min(8, max(1, width)),)


def _apply_depthwise(sch: s_tir.Schedule, block: SBlockRV, *, pad_mode: str, width_tile: int,
                     channels_outer: bool, lanes_cap: int) -> bool:
    loops = sch.get_loops(block)
    if len(loops) != 7:
        return False
    n, h, w, c, ry, rx, rc = loops
    width, channels = extent(sch, w), extent(sch, c)
    if width is None or channels is None:
        return False
    lanes = lanes_for(channels, lanes_cap)
    if lanes is None:
        return False

    epilogue = None  # elementwise consumers: inlined into the last one, which runs per tile
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            break
        if not sch.get_consumers(consumers[0]):
            epilogue = consumers[0]
            break
        sch.compute_inline(consumers[0])

    groups, lane = sch.split(c, [None, lanes])
    w_outer, w_inner = sch.split(w, [None, width_tile])
    tile_order = (groups, w_outer) if channels_outer else (w_outer, groups)
    sch.reorder(n, h, *tile_order, rc, ry, rx, w_inner, lane)
    outer = sch.fuse(n, h, groups) if channels_outer else sch.fuse(n, h)
    tile = w_outer if channels_outer else groups
    sch.parallel(outer)
    for lp in (ry, rx, w_inner):
        sch.unroll(lp)
    sch.vectorize(lane)

    for producer in sch.get_producers(block):  # the padding (the weights are parameters)
        if pad_mode == "inline":
            sch.compute_inline(producer)
        else:
            sch.compute_at(producer, tile)
            sch.vectorize(sch.get_loops(producer)[-1])

    if epilogue is not None:
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(epilogue, tile)
        sch.vectorize(sch.get_loops(epilogue)[-1])
    # the reduction's init is split out by MetaSchedule's RewriteReductionBlock postproc, which
    # must run after its parallel/vectorize rewrite (that rewrite rejects a split reduction)
    return True


#: ``schedule_rule`` value -> rule function, for :func:`omnic.compile.rules.register`
RULES: dict[str, Callable[[s_tir.Schedule, SBlockRV], list[s_tir.Schedule]]] = {DEPTHWISE_RULE: schedule_depthwise}
