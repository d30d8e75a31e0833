"""Default schedule of pooling kernels: max, average and adaptive pools, and global pooling.

TOPI's pools carry a ``schedule_rule`` annotation (``meta_schedule.pool_max``, ``pool_avg``,
``adaptive_pool_avg``...); global average pooling reaches the kernels as a ``mean`` over the
spatial axes of an NHWC tensor (omnic's frontend lowers ``AdaptiveAvgPool2d(1)`` so, and
``x.mean((2, 3))`` after an NHWC conv becomes the same). This rule schedules both: the annotated
blocks, and a single reduction over the middle axes of a rank-4 tensor that keeps its innermost
axis. A reduction over the innermost axis (softmax, layer norm, an NCHW mean over H and W) is a
row reduction, left to the next rule.

The window reduction runs in vector registers over the output's innermost axis (channels in
NHWC): padding read in place, a small window unrolled over a register tile of a few output
pixels (or, for a large window, of a few channel vectors), the average's division and any fused
elementwise epilogue applied to the tile before it is stored, outer output loops parallel when
the kernel is large enough for threads to pay. The tuning-time rule
(:mod:`omnic.compile.rules.pool`) explores the same structure.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from omnic.compile.rules.cpu.base import CPURule, accumulate_in_registers, vector_lanes
from omnic.compile.rules.cpu.depthwise import (channel_lanes, fuse_epilogue, position, root_blocks, vectorize_tile,
                                               width_tile)
from omnic.compile.rules.marking import POOL_RULES
from omnic.compile.rules.utils import REDUCTION, SPATIAL, extent, iter_kinds

#: unroll the window loops when the window has at most this many elements
MAX_UNROLLED_WINDOW = 64
#: output elements x window elements below which a pool runs on one thread (the thread pool's
#: wake-up costs more than the work it would share)
MIN_PARALLEL_WORK = 1 << 18
#: channel vectors per register tile of a large-window (global) pool
GLOBAL_TILE_VECTORS = 4


@dataclass(frozen=True, kw_only=True)
class PoolKernel:
    """The blocks of a pooling kernel.

    Attributes:
        reduction: The window reduction (for a nested adaptive pool, the spatial block holding it).
        vector_axis: Position among the reduction's spatial loops of the one to vectorize.
        nested: Whether the window's extent varies per output (adaptive pools whose input is not
            a multiple of the output): TOPI then nests the reduction in a spatial block.
    """

    reduction: SBlockRV
    vector_axis: int
    nested: bool = False


def _annotated(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> bool:
    pending = list(blocks)
    while pending:
        block = pending.pop()
        if str(sch.get(block).annotations.get("schedule_rule", "")) in POOL_RULES:
            return True
        pending += list(sch.get_child_blocks(block))
    return False


def _spatial_pool_axis(sch: s_tir.Schedule, block: SBlockRV) -> int | None:
    """For a reduction over the middle axes of a rank-4 (NHWC) tensor that keeps its innermost
    axis, the position of that axis among the block's spatial iterators; else None."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return None
    spatial = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == SPATIAL]
    reduce = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == REDUCTION]
    out = stmt.writes[0].source
    for region in stmt.reads:
        if region.source.same_as(out) or len(region.region) != 4:
            continue
        mins = [r.min for r in region.region]
        inner = next((i for i, v in enumerate(spatial) if mins[3].same_as(v)), None)
        outer_reduced = all(any(m.same_as(r) for m in mins[1:3]) for r in reduce)
        if inner is not None and reduce and outer_reduced:
            return inner
    return None


def find_pool(sch: s_tir.Schedule) -> PoolKernel | None:
    """The pooling reduction of a kernel, or None when the kernel is not a pool."""
    blocks = root_blocks(sch)
    reductions = [b for b in blocks if REDUCTION in iter_kinds(sch, b)]
    if len(reductions) == 1:
        block = reductions[0]
        if len(sch.get(block).writes) != 1:
            return None
        if _annotated(sch, blocks):
            kinds = iter_kinds(sch, block)
            loops = sch.get_loops(block)
            if len(loops) != len(kinds):
                return None
            spatial = [lp for lp, k in zip(loops, kinds) if k == SPATIAL]
            wide = [i for i, lp in enumerate(spatial) if (extent(sch, lp) or 0) > 1]
            return PoolKernel(reduction=block, vector_axis=wide[-1] if wide else len(spatial) - 1)
        axis = _spatial_pool_axis(sch, block)
        return None if axis is None else PoolKernel(reduction=block, vector_axis=axis)
    if not reductions and _annotated(sch, blocks):
        holders = [b for b in blocks if any(REDUCTION in iter_kinds(sch, c) for c in sch.get_child_blocks(b))]
        if len(holders) == 1:
            return PoolKernel(reduction=holders[0], vector_axis=len(sch.get_loops(holders[0])) - 1, nested=True)
    return None


def _maybe_parallel(sch: s_tir.Schedule, loops: list[LoopRV], work: int) -> LoopRV | None:
    """Fuse ``loops`` (the outer output loops) and run them in parallel when ``work`` pays for it."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= MIN_PARALLEL_WORK and (extent(sch, fused) or 0) > 1:
        sch.parallel(fused)
    return fused


class Pool(CPURule):
    """Max / average / adaptive pooling and NHWC global pooling, with their fused epilogue."""

    name = "pool"

    def schedule(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        pool = find_pool(sch)
        if pool is None:
            return None
        blocks = root_blocks(sch)
        for producer in blocks[:position(sch, blocks, pool.reduction)]:
            sch.compute_inline(producer)  # the padding, read in place
        epilogue = fuse_epilogue(sch, pool.reduction, root_blocks(sch))
        if pool.nested:
            return self._nested(sch, pool, epilogue)
        return self._window(sch, pool, epilogue, target)

    def _nested(self, sch: s_tir.Schedule, pool: PoolKernel, epilogue: SBlockRV | None) -> s_tir.Schedule:
        # a window of varying extent cannot move inside the vector loop: parallel output pixels only
        loops = sch.get_loops(pool.reduction)
        sizes = [extent(sch, lp) or 1 for lp in loops]
        work = MAX_UNROLLED_WINDOW
        for size in sizes:
            work *= size
        fused = _maybe_parallel(sch, loops[:-1], work)
        if epilogue is not None and fused is not None:
            sch.reverse_compute_at(epilogue, fused)
        return sch

    def _window(self, sch: s_tir.Schedule, pool: PoolKernel, epilogue: SBlockRV | None,
                target: tvm.target.Target) -> s_tir.Schedule | None:
        reduction = pool.reduction
        kinds = iter_kinds(sch, reduction)
        loops = sch.get_loops(reduction)
        spatial = [lp for lp, k in zip(loops, kinds) if k == SPATIAL]
        window = [lp for lp, k in zip(loops, kinds) if k == REDUCTION]
        sizes = [extent(sch, lp) for lp in loops]
        if any(s is None for s in sizes) or not window:
            return None
        window_size = 1
        for lp in window:
            window_size *= extent(sch, lp)
        outputs = 1
        for lp in spatial:
            outputs *= extent(sch, lp)

        target_lanes = vector_lanes(target, "float32")
        channel = spatial[pool.vector_axis]
        others = [lp for i, lp in enumerate(spatial) if i != pool.vector_axis]
        channels = extent(sch, channel)
        lanes = channel_lanes(channels, target_lanes)
        blocks_count = -(-channels // lanes)
        small = window_size <= MAX_UNROLLED_WINDOW
        wide = [lp for lp in others if extent(sch, lp) > 1]
        if small and wide:
            # a tile of output pixels along the next-inner axis (W in NHWC)
            row = wide[-1]
            row_outer, tile = sch.split(row, [None, width_tile(extent(sch, row))])
            outer = [lp if not lp.same_as(row) else row_outer for lp in others]
            block_outer, lane = sch.split(channel, [None, lanes])
            sch.reorder(*outer, block_outer, *window, tile, lane)
            rows = outer[:-1] if outer[-1].same_as(row_outer) else outer
            _maybe_parallel(sch, rows, outputs * window_size)
            anchor = block_outer
        else:
            # a tile of channel vectors (global pooling, or a single output row)
            per_tile = max(d for d in range(1, GLOBAL_TILE_VECTORS + 1) if blocks_count % d == 0)
            block_outer, tile, lane = sch.split(channel, [None, per_tile, lanes])
            sch.reorder(*others, block_outer, *window, tile, lane)
            anchor = _maybe_parallel(sch, [*others, block_outer], outputs * window_size)
        if small:
            for lp in window:
                sch.unroll(lp)
        sch.unroll(tile)
        sch.vectorize(lane)
        epilogue = accumulate_in_registers(sch, reduction, epilogue, anchor)
        init = sch.decompose_reduction(reduction, window[0])
        vectorize_tile(sch, init, anchor)
        vectorize_tile(sch, epilogue, anchor)
        return sch
