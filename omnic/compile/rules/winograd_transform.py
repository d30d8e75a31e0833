"""Schedule rule for the data and inverse transform blocks of omnic's Winograd convolutions.

The blocks (``(e, u, tile, channel)`` loops, built by :mod:`omnic.compile.winograd`) pick one
sparse sum per tile position ``(e, u)`` through a conditional chain, so those two loops must be
unrolled (then each element is a few adds); the channels go in vector lanes and the tiles x
channel groups run in parallel. TVM registers no CPU schedule for such transforms, and the
generic rules leave the conditional chain in the loop body.
"""
from __future__ import annotations

from typing import Callable

from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV

from omnic.compile.rules.marking import DATA_TRANSFORM_RULE, INVERSE_TRANSFORM_RULE
from omnic.compile.rules.utils import applied_variants, extent, is_reduction, lanes_for

#: the design space: widest vector, tile loop outside or inside the channel groups
VARIANTS = tuple({"lanes_cap": lanes_cap, "tiles_outer": tiles_outer}
                 for lanes_cap, tiles_outer in ((16, True), (8, True), (16, False)))


def schedule_winograd_transform(sch: s_tir.Schedule, block: SBlockRV, *,
                                inline_padding: bool) -> list[s_tir.Schedule]:
    """Design space of a Winograd transform block (the input schedule if no variant fits).

    Args:
        sch: The schedule holding ``block``.
        block: The transform block.
        inline_padding: Read the producer (the data padding) in place; the inverse transform's
            producer is the GEMM's write cache, which must stay a block of its own.
    """
    settings = ({**variant, "inline_padding": inline_padding} for variant in VARIANTS)
    return applied_variants(sch, block, _apply_transform, settings) or [sch]


def schedule_data_transform(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """The rule of :data:`DATA_TRANSFORM_RULE` blocks (padding read in place)."""
    return schedule_winograd_transform(sch, block, inline_padding=True)


def schedule_inverse_transform(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """The rule of :data:`INVERSE_TRANSFORM_RULE` blocks (the GEMM's write cache left alone)."""
    return schedule_winograd_transform(sch, block, inline_padding=False)


def _apply_transform(sch: s_tir.Schedule, block: SBlockRV, *, lanes_cap: int, tiles_outer: bool,
                     inline_padding: bool) -> bool:
    for producer in sch.get_producers(block) if inline_padding else ():
        if not is_reduction(sch, producer):
            try:
                sch.compute_inline(producer)
            except Exception:  # noqa: BLE001 - not inlinable: leave it
                pass
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return False
    e, u, tiles, channels = loops
    lanes = lanes_for(extent(sch, channels) or 0, lanes_cap)
    if lanes is None:
        return False
    groups, lane = sch.split(channels, [None, lanes])
    outer = (tiles, groups) if tiles_outer else (groups, tiles)
    sch.reorder(*outer, e, u, lane)
    fused = sch.fuse(*outer)
    sch.unroll(e)
    sch.unroll(u)
    sch.vectorize(lane)
    sch.parallel(fused)
    return True


#: ``schedule_rule`` value -> rule function, for :func:`omnic.compile.rules.register`
RULES: dict[str, Callable[[s_tir.Schedule, SBlockRV], list[s_tir.Schedule]]] = {
    DATA_TRANSFORM_RULE: schedule_data_transform, INVERSE_TRANSFORM_RULE: schedule_inverse_transform}
