"""Default schedule of fp32 NHWC depthwise convolutions and their fused epilogue.

The kernel is TOPI's ``group_conv2d_nhwc`` with one input channel per group (a channel
multiplier above 1 is scheduled too, less efficiently): an optional padding block, the conv,
then the elementwise epilogue FuseOps put behind it (bias, clip as max/min, hardswish, residual).

The schedule follows the structure of omnic's tuning space for these kernels
(:mod:`omnic.compile.rules.depthwise`), fixed to one point chosen from the shapes:

- the weight is re-laid out at compile time to ``[KH, KW, 1, C]`` (channels contiguous), in a
  block marked as layout-rewrite preprocessing that the build folds into a new constant;
- each parallel task is an output row (times a chunk of channel blocks when rows are few);
  inside it, tiles of ``width_tile`` output pixels x ``lanes`` channels are accumulated in
  vector registers while the whole kernel window is unrolled over them (one weight vector per
  tap, shared by the tile's pixels);
- the padding is read in place (a bounds check per input row and column of the tile);
- the epilogue is inlined into one block applied to the tile before it is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

from omnic.compile.rules.cpu.base import CPURule, accumulate_in_registers, num_cores, vector_lanes
from omnic.compile.rules.utils import REDUCTION, SPATIAL, extent, iter_kinds

#: the annotation MetaSchedule's RewriteLayout puts on a weight re-layout block; the build splits
#: such blocks out of the kernel and folds them into constants (``SplitLayoutRewritePreproc``)
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"
#: vector registers a tile's accumulators may take (of 16 on AVX2, 32 on AVX-512 and NEON)
ACCUMULATOR_REGISTERS = 8
#: parallel tasks per core wanted before the channel blocks are split among tasks too
TASKS_PER_CORE = 4


@dataclass(frozen=True, kw_only=True)
class DepthwiseTiling:
    """The point of the schedule chosen for one kernel.

    Attributes:
        lanes: Channels per vector (the innermost, vectorized loop).
        width_tile: Output pixels along W per register tile.
        channel_chunks: Parts the channel blocks of a row are split into among parallel tasks.
    """

    lanes: int
    width_tile: int
    channel_chunks: int


def channel_lanes(channels: int, lanes: int) -> int:
    """Channels per vector for an innermost axis of ``channels``: the widest power of two up to
    ``lanes`` (at least 4) that divides it; else the whole axis when it fits in one vector, else
    ``lanes`` (the last vector then runs predicated)."""
    width = lanes
    while width >= 4:
        if channels % width == 0:
            return width
        width //= 2
    return min(channels, lanes)


def width_tile(width: int) -> int:
    """Output pixels per register tile along an output row of ``width``: its largest divisor
    within the accumulator budget, or, when that divisor is under half the budget (a prime
    width), the budget's even share of the row with a predicated last tile."""
    budget = min(ACCUMULATOR_REGISTERS, width)
    best = max(d for d in range(1, budget + 1) if width % d == 0)
    if best * 2 >= budget:
        return best
    tiles = -(-width // budget)
    return -(-width // tiles)


def choose_tiling(rows: int, width: int, channels: int, target: tvm.target.Target) -> DepthwiseTiling:
    """The tiling of a depthwise conv with ``rows`` output rows (batch x height) of ``width``
    pixels and ``channels`` output channels, for ``target``."""
    lanes = channel_lanes(channels, vector_lanes(target, "float32"))
    blocks = -(-channels // lanes)
    wanted = TASKS_PER_CORE * num_cores(target)
    chunks = 1
    if rows < wanted:
        chunks = next((d for d in range(1, blocks + 1) if blocks % d == 0 and rows * d >= wanted), blocks)
    return DepthwiseTiling(lanes=lanes, width_tile=width_tile(width), channel_chunks=chunks)


def root_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def position(sch: s_tir.Schedule, blocks: list[SBlockRV], block: SBlockRV) -> int:
    """Index of ``block`` in ``blocks`` (random variables of one block differ as objects)."""
    stmt = sch.get(block)
    return next(i for i, b in enumerate(blocks) if sch.get(b).same_as(stmt))


def is_depthwise_nhwc(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether ``block`` is an fp32 NHWC grouped conv with one input channel per group."""
    stmt = sch.get(block)
    if not stmt.name_hint.startswith(("group_conv2d_nhwc", "depthwise_conv2d_nhwc")):
        return False
    if iter_kinds(sch, block) != [SPATIAL] * 4 + [REDUCTION] * 3:
        return False
    rc = stmt.iter_vars[6].dom.extent
    return (hasattr(rc, "value") and int(rc.value) == 1 and len(stmt.writes) == 1
            and str(stmt.writes[0].source.dtype) == "float32" and len(sch.get_loops(block)) == 7)


def fuse_epilogue(sch: s_tir.Schedule, anchor: SBlockRV, blocks: list[SBlockRV]) -> SBlockRV | None:
    """Inline the spatial blocks after ``anchor`` into the last one, which is returned (None when
    ``anchor`` writes the output itself).

    Raises:
        ValueError: The blocks after the anchor are not one elementwise epilogue.
    """
    after = blocks[position(sch, blocks, anchor) + 1:]
    if not after:
        return None
    if any(REDUCTION in iter_kinds(sch, b) for b in after):
        raise ValueError("a reduction after the anchor")
    for block in after[:-1]:
        sch.compute_inline(block)
    last = after[-1]
    if sch.get_consumers(last) or not sch.get_producers(last):
        raise ValueError("the epilogue is not a chain ending in the output")
    return last


def weight_read_index(func: tvm.tirx.PrimFunc, sch: s_tir.Schedule, block: SBlockRV) -> int | None:
    """Index among the reads of ``block`` of a parameter listed in ``layout_free_buffers``."""
    attrs = func.attrs
    free = {int(i) for i in (attrs.get("layout_free_buffers", []) if attrs is not None else [])}
    params = [func.params[i] for i in free if i < len(func.params)]
    for index, region in enumerate(sch.get(block).reads):
        if any(p.same_as(region.source) for p in params):
            return index
    return None


def relayout_weight(func: tvm.tirx.PrimFunc, sch: s_tir.Schedule, conv: SBlockRV) -> None:
    """Read the weight ``[C, KH, KW, 1]`` as ``[KH, KW, 1, C]`` (a tap's channels contiguous),
    re-laid out in a preprocessing block the build folds at compile time; nothing when the weight
    is not a layout-free constant (then it is read in place, strided)."""
    index = weight_read_index(func, sch, conv)
    if index is None:
        return
    cached = sch.cache_read(conv, index, "global")
    sch.annotate(cached, LAYOUT_REWRITE_PREPROC, True)
    sch.transform_layout(conv, ("read", index), lambda o, kh, kw, i: (kh, kw, i, o))


def parallel_rows(sch: s_tir.Schedule, loops: list[LoopRV]) -> LoopRV:
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)
    return fused


def vectorize_tile(sch: s_tir.Schedule, block: SBlockRV, anchor: LoopRV) -> None:
    """Vectorize the innermost loop of ``block`` and unroll its other loops below ``anchor`` (the
    loop the block was computed at: what is below it is one register tile)."""
    loops = sch.get_loops(block)
    at = sch.get(anchor)
    below = loops[next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(at)) + 1:]
    if not below:
        return
    sch.vectorize(below[-1])
    for lp in below[:-1]:
        if (extent(sch, lp) or 0) > 1:
            sch.unroll(lp)


class DepthwiseNHWC(CPURule):
    """fp32 NHWC depthwise convs (any kernel size, stride, padding and channel count) with
    their fused elementwise epilogue."""

    name = "depthwise_nhwc"

    def schedule(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        convs = [b for b in blocks if is_depthwise_nhwc(sch, b)]
        if len(convs) != 1:
            return None
        conv = convs[0]
        before = blocks[:position(sch, blocks, conv)]
        if any(REDUCTION in iter_kinds(sch, b) for b in before):
            return None
        epilogue = fuse_epilogue(sch, conv, blocks)
        relayout_weight(func, sch, conv)

        n, h, w, c, ry, rx, rc = sch.get_loops(conv)
        sizes = [extent(sch, lp) for lp in (n, h, w, c)]
        if any(s is None for s in sizes):
            return None
        tiling = choose_tiling(sizes[0] * sizes[1], sizes[2], sizes[3], target)
        blocks_outer, blocks_inner, lane = sch.split(c, [tiling.channel_chunks, None, tiling.lanes])
        w_outer, w_inner = sch.split(w, [None, tiling.width_tile])
        sch.reorder(n, h, blocks_outer, w_outer, blocks_inner, rc, ry, rx, w_inner, lane)
        parallel_rows(sch, [n, h, blocks_outer])
        tile = blocks_inner

        # the padding is read in place: its bounds checks cost less than a copy of the input
        for producer in before:
            sch.compute_inline(producer)

        epilogue = accumulate_in_registers(sch, conv, epilogue, tile)
        for lp in (ry, rx, w_inner):
            sch.unroll(lp)
        sch.vectorize(lane)
        init = sch.decompose_reduction(conv, rc)
        vectorize_tile(sch, init, tile)
        vectorize_tile(sch, epilogue, tile)
        return sch
