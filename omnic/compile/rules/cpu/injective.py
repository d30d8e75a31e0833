"""The default schedule of kernels made only of spatial blocks: elementwise chains, broadcasts,
transposes, reshapes, concatenation, slicing, padding, resizes, gathers and casts, and any fused
mixture of them (the catch-all of the default rules, tried after the specific ones).

Every block that can be inlined into its consumer (or its producer) without recomputing
expensive elements is; each block left (usually only the one writing the output) becomes, from
the inside out: one vector of the innermost output axis (unrolled instead when too narrow for a
vector), loops in the output's order, and the leading loops fused into one parallel loop when
the kernel has enough work to pay for waking the other threads. A transpose whose innermost
output axis is not the innermost axis of its input is tiled in 2-D, so that both the rows it
reads and the rows it writes stay in cache. fp32 ``exp``, ``erf`` and ``sigmoid`` (GELU, SiLU)
become vector polynomials (:mod:`~omnic.compile.rules.cpu.fastmath`).

The rule never gives up on a kernel it takes: when a step does not fit (a shape it did not
foresee, a schedule primitive that refuses), it retries with fewer steps, down to the kernel's
own blocks with their outer loops parallel.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.prim import expr as prim
from tvm.s_tir.dlight.analysis import normalize_prim_func

from omnic.compile.rules.cpu.base import CPURule, num_cores, vector_lanes
from omnic.compile.rules.cpu.fastmath import use_fast_math

#: work (elements written, weighted by :func:`element_cost`) a block must do before its loops are
#: split across threads: below that, waking the other threads costs more than the work they share
PARALLEL_MIN_WORK = 65536
#: an element's cost, in simple arithmetic ops, per transcendental call it makes (these run as
#: library calls or long polynomials, dozens of times slower than an add)
TRANSCENDENTAL_COST = 20
TRANSCENDENTALS = frozenset(f"tirx.{op}" for op in (
    "exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "sigmoid", "tanh", "erf", "pow", "sin",
    "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh"))
#: the parallel loop is fused out of enough leading loops to have this many iterations per
#: thread (uneven rows then balance)
PARALLEL_ITERS_PER_CORE = 4
#: narrowest vector the rule forms (narrower ones rarely beat LLVM's scalar code)
MIN_VECTOR = 4
#: float ops an element may cost and still be recomputed for every point a consumer reads (a copy,
#: a pad, a bias add or a clip is; a hard-swish or anything with a transcendental is not)
CHEAP_FLOAT_OPS = 4
#: edge of a transpose tile along the input's innermost axis (a 64-byte line of fp32)
TRANSPOSE_TILE = 16
#: loops of at most this many iterations around the vector (or innermost, when too narrow for
#: a vector) are unrolled
MAX_UNROLL = 8

LoopRV = s_tir.schedule.LoopRV
SBlockRV = s_tir.schedule.SBlockRV

get_block_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


# ------------------------------------------------------------------------------------- helpers
def static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """The loop's iteration count, or None when it is not a constant."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def pow2_factor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap`` (at least 1)."""
    f = 1
    while f * 2 <= cap and n % (f * 2) == 0:
        f *= 2
    return f


def _product(values: Sequence[int | None]) -> int | None:
    total = 1
    for v in values:
        if v is None:
            return None
        total *= v
    return total


def _vars_of(expr: tirx.Expr) -> set:
    return set(tirx.analysis.undefined_vars(expr))


def _drop_unit_loops(sch: s_tir.Schedule, loops: list[LoopRV]) -> list[LoopRV]:
    """Fuse each loop of one iteration into a neighbour, so that shape analysis sees real axes."""
    extents = [static_extent(sch, lp) for lp in loops]
    if len(loops) < 2 or all(e != 1 for e in extents):
        return loops
    groups: list[list[LoopRV]] = []
    pending: list[LoopRV] = []  # unit loops before the first real one
    for lp, ext in zip(loops, extents):
        if ext == 1:
            (groups[-1] if groups else pending).append(lp)
        else:
            groups.append(pending + [lp])
            pending = []
    if pending:  # every loop is a unit loop
        groups.append(pending)
    return [sch.fuse(*g) if len(g) > 1 else g[0] for g in groups]


def element_cost(sch: s_tir.Schedule, block: SBlockRV) -> int:
    """Cost of one element of the block, in simple ops: 1, plus :data:`TRANSCENDENTAL_COST` per
    transcendental call (a sigmoid or an erf makes a small tensor worth sharing out)."""
    calls = []
    tvm_ffi.structural_walk(sch.get(block).body, [(tvm.ir.expr.Call, lambda c: calls.append(c.op))],
                            order="post")
    return 1 + TRANSCENDENTAL_COST * sum(1 for op in calls if getattr(op, "name", "") in TRANSCENDENTALS)


def is_spatial_block(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether every iterator of the block is spatial and it has no init (dlight's analysis counts
    a reduction over one element, a 1x1 conv on one channel, as spatial; inlining its consumer
    into it would apply the consumer in the init and again in the update)."""
    stmt = sch.get(block)
    return stmt.init is None and all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars)


def _dtype_of(sch: s_tir.Schedule, block: SBlockRV) -> str:
    writes = sch.get(block).writes
    return str(writes[0].source.dtype) if writes else "float32"


def _strided_reads(stmt, inner_var) -> list:
    """The innermost index of each input ``stmt`` reads at a stride along ``inner_var`` (the
    variable of the innermost axis it writes): inputs read in another order than written."""
    found = []
    for region in stmt.reads:
        idx = [r.min for r in region.region]
        if len(idx) < 2 or inner_var in _vars_of(idx[-1]):
            continue  # read along its rows
        if any(inner_var in _vars_of(e) for e in idx[:-1]):  # else broadcast along the axis
            found.append(idx[-1])
    return found


def reads_transposed(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether the block reads an input in another order than it writes (a transpose)."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1 or not stmt.writes[0].region:
        return False
    last = stmt.writes[0].region[-1].min
    return isinstance(last, tirx.Var) and bool(_strided_reads(stmt, last))


def transposed_axis(sch: s_tir.Schedule, block: SBlockRV, loops: list[LoopRV]) -> int | None:
    """Position in ``loops`` of the axis a transpose should tile against the innermost one.

    That is the loop whose variable alone indexes the innermost axis of an input the block reads
    along its innermost loop at a stride (an input it reads in another order than it writes);
    None when every input is read along rows (or broadcast), or the loops are not plain.
    """
    if len(loops) < 2:
        return None
    realize = get_block_realize(sch, block)
    stmt = sch.get(block)
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    position = {}
    for iv, value in zip(stmt.iter_vars, realize.iter_values):
        for i, lv in enumerate(loop_vars):
            if value.same_as(lv):
                position[iv.var] = i
    inner = [v for v, i in position.items() if i == len(loops) - 1]
    if not inner:
        return None
    for last in _strided_reads(stmt, inner[0]):
        if isinstance(last, tirx.Var) and last in position:
            return position[last]
    return None


# --------------------------------------------------------------------------- one spatial block
def parallelize(sch: s_tir.Schedule, loops: Sequence[LoopRV], *, cores: int,
                work: int | None) -> LoopRV | None:
    """Fuse leading ``loops`` into one parallel loop with a few iterations per thread.

    Nothing happens on one core, or when ``work`` (elements the block writes times
    :func:`element_cost`) is less than :data:`PARALLEL_MIN_WORK`; unknown work is shared.
    Returns the parallel loop, if any.
    """
    if cores < 2 or not loops or (work is not None and work < PARALLEL_MIN_WORK):
        return None
    chosen, extent = [], 1
    for lp in loops:
        ext = static_extent(sch, lp)
        if ext is None and chosen:
            break
        chosen.append(lp)
        if ext is None:
            break
        extent *= ext
        if extent >= PARALLEL_ITERS_PER_CORE * cores:
            break
    if extent < 2:
        return None
    fused = sch.fuse(*chosen) if len(chosen) > 1 else chosen[0]
    sch.parallel(fused)
    return fused


def _unroll_small(sch: s_tir.Schedule, loop: LoopRV) -> None:
    ext = static_extent(sch, loop)
    if ext is not None and 1 < ext <= MAX_UNROLL:
        sch.unroll(loop)


def _vector_width(extent: int | None, lanes: int) -> int:
    """The vector along an innermost axis of ``extent``: the widest power of two up to ``lanes``
    that divides it, or 1 when that is narrower than :data:`MIN_VECTOR` (an odd width: LLVM
    vectorizes such a plain loop itself, with a scalar tail, better than a padded TVM vector)."""
    if extent is None:
        return 1
    width = pow2_factor(extent, lanes)
    return width if width >= min(MIN_VECTOR, lanes) else 1


def schedule_spatial_block(sch: s_tir.Schedule, block: SBlockRV, target: tvm.target.Target, *,
                           tile_transposes: bool = True, vectorize: bool = True) -> None:
    """Vectorize, tile (transposes) and parallelize one block whose loops are all spatial.

    Args:
        sch: The schedule holding the block.
        block: A block with only spatial iterators, its loops as lowered (not yet transformed).
        target: The CPU target (vector width, cores).
        tile_transposes: Tile a block that reads an input in another order than it writes it.
        vectorize: Form vectors at all (off: loops and parallelism only).
    """
    loops = _drop_unit_loops(sch, list(sch.get_loops(block)))
    if not loops:
        return
    cores = num_cores(target)
    lanes = vector_lanes(target, _dtype_of(sch, block))
    extents = [static_extent(sch, lp) for lp in loops]
    elements = _product(extents)
    work = None if elements is None else elements * element_cost(sch, block)
    if not vectorize:
        parallelize(sch, loops, cores=cores, work=work)
        return

    axis = transposed_axis(sch, block, loops) if tile_transposes else None
    if axis is not None and extents[-1] is not None and extents[axis] is not None:
        out_width = pow2_factor(extents[-1], lanes)
        in_width = pow2_factor(extents[axis], TRANSPOSE_TILE)
        if out_width >= min(MIN_VECTOR, lanes) and in_width >= MIN_VECTOR:
            i_out, i_in = sch.split(loops[axis], factors=[None, in_width])
            o_out, o_in = sch.split(loops[-1], factors=[None, out_width])
            rest = [lp for k, lp in enumerate(loops) if k not in (axis, len(loops) - 1)]
            sch.reorder(*rest, i_out, o_out, i_in, o_in)
            sch.vectorize(o_in)
            sch.unroll(i_in)  # a column of gathers, nothing else
            parallelize(sch, [*rest, i_out, o_out], cores=cores, work=work)
            return

    width = _vector_width(extents[-1], lanes)
    if width > 1:
        outer, lane = sch.split(loops[-1], factors=[None, width])
        sch.vectorize(lane)
        loops = loops[:-1] + [outer]
        if len(loops) > 1:
            _unroll_small(sch, loops[-1])
    elif len(loops) > 1 and extents[-1] is not None and extents[-1] <= MAX_UNROLL:
        # a narrow innermost axis (3 channels): unrolled, the loop around it is one LLVM
        # vectorizes with interleaved loads and stores, which a fused TVM vector of gathers is not
        sch.unroll(loops[-1])
        loops = loops[:-1]
    parallelize(sch, loops, cores=cores, work=work)


# -------------------------------------------------------------------------------------- inlining
_ARITH = (prim.Add, prim.Sub, prim.Mul, prim.Div, prim.Mod, prim.FloorDiv, prim.FloorMod, prim.Min, prim.Max,
          prim.Cast, prim.Select, tvm.ir.expr.Call)


def _float_ops(stmt) -> int:
    """Arithmetic on floats in ``stmt`` (index arithmetic is not counted)."""
    count = [0]

    def visit(node):
        if "float" in str(node.ty):
            count[0] += 1

    tvm_ffi.structural_walk(stmt, [(_ARITH, visit)], order="post")
    return count[0]


def _reads(sch: s_tir.Schedule, consumer: SBlockRV, buffer) -> int:
    """Loads of ``buffer`` in one element of ``consumer`` (two loads of one point count twice:
    inlined, each is a copy of the producer's expression)."""
    count = [0]

    def visit(load):
        if load.source.same_as(buffer):
            count[0] += 1

    tvm_ffi.structural_walk(sch.get(consumer).body, [(tvm.ir.expr.TensorLoad, visit)], order="post")
    return count[0]


def _cheap(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    # a transpose is not: recomputed at several points, each is a strided read
    return (element_cost(sch, block) == 1 and _float_ops(sch.get(block).body) <= CHEAP_FLOAT_OPS
            and not reads_transposed(sch, block))


def _read_once(sch: s_tir.Schedule, producer: SBlockRV, consumers: Sequence[SBlockRV]) -> bool:
    writes = sch.get(producer).writes
    return len(writes) == 1 and sum(_reads(sch, c, writes[0].source) for c in consumers) <= 1


def worth_inlining(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """Whether inlining ``block`` into its consumers computes each of its elements about once.

    A cheap block (a copy, a pad, a clip; not a transpose) may be recomputed for every point its
    consumers read; an expensive one (a sigmoid, a hard-swish, a bilinear resize) only where they
    read it once in all (an elementwise chain), not where a resize, a second consumer or a second
    use reads it again.
    """
    return is_spatial_block(sch, block) and (_cheap(sch, block)
                                             or _read_once(sch, block, sch.get_consumers(block)))


def worth_inlining_into_producer(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """:func:`worth_inlining` for inlining ``block`` into its producer (which then computes the
    block's expression, with a copy of its own for every load of it the block makes)."""
    producers = sch.get_producers(block)
    return (len(producers) == 1 and is_spatial_block(sch, producers[0])
            and (_cheap(sch, producers[0]) or _read_once(sch, producers[0], [block])))


def _inline_first(sch: s_tir.Schedule, blocks: list, worth: Callable, inline: Callable) -> int | None:
    """Inline the first of ``blocks`` that is ``worth`` it and that ``inline`` takes; its index."""
    for i, info in enumerate(blocks):
        try:
            if worth(sch, info.block_rv):
                inline(info.block_rv)
                return i
        except Exception:  # noqa: BLE001, S112 - an output block, or one its neighbours cannot take
            continue
    return None


def inline_all(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline every block that can go into its consumers or its producer, where that does not
    recompute expensive elements (:func:`worth_inlining`), until none can; returns the blocks
    left, in order."""
    blocks = list(blocks)
    while True:
        i = _inline_first(sch, blocks, worth_inlining, sch.compute_inline)
        if i is None:
            i = _inline_first(sch, blocks, worth_inlining_into_producer, sch.reverse_compute_inline)
        if i is None:
            return blocks
        blocks.pop(i)


def _plans(target: tvm.target.Target) -> list[Callable[[s_tir.Schedule, SBlockRV], None]]:
    """The schedules of one block, most elaborate first."""
    return [lambda s, b: schedule_spatial_block(s, b, target),
            lambda s, b: schedule_spatial_block(s, b, target, tile_transposes=False),
            lambda s, b: schedule_spatial_block(s, b, target, vectorize=False)]


def _fast_math(sch: s_tir.Schedule, blocks: Sequence[SBlockRV]) -> None:
    try:
        use_fast_math(sch, blocks)
    except Exception:  # noqa: BLE001 - a body the swap cannot rebuild keeps libm's functions
        return


def schedule_spatial_kernel(func: tirx.PrimFunc, target: tvm.target.Target, *,
                            fast_math: bool = True) -> s_tir.Schedule | None:
    """The schedule of a kernel whose blocks are all spatial, or None when it has another kind
    of block (a reduction) or is not in a form the schedule can read.

    With ``fast_math``, fp32 ``exp`` / ``erf`` / ``sigmoid`` become TOPI's vector polynomials
    (:mod:`~omnic.compile.rules.cpu.fastmath`) instead of a libm call per element.
    """
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None or not all(is_spatial_block(sch, info.block_rv) for info in infos):
        return None
    plans = _plans(target)
    for inline in (True, False):
        for k, plan in enumerate(plans):
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            try:
                if inline:
                    infos = inline_all(sch, infos)
                for info in infos:
                    plan(sch, info.block_rv)
                if fast_math:  # after the plan, whose thread count counts the calls' cost
                    _fast_math(sch, [info.block_rv for info in infos])
                return sch
            except Exception:  # a step that does not fit: try a plainer schedule
                if k == len(plans) - 1 and not inline:
                    raise
    return None


class InjectiveRule(CPURule):
    """Elementwise, broadcast, layout (transpose, reshape, concat, slice, pad), resize, gather
    and cast kernels: every block spatial, fused, inlined, vectorized and parallel."""

    name = "injective"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        return schedule_spatial_kernel(func, target)
