"""Default CPU schedule of reductions: softmax, log-softmax, layer norm, mean / sum / max over any axes.

A kernel here is a few blocks, at least one of them a reduction, the rest elementwise or
broadcasting around them (``max -> exp -> sum -> divide``, ``sum -> mean -> var -> normalize``,
``sum -> divide -> add``). Two schedules, picked by where the reduced axes lie in memory:

- **rows** (the reduced axes are the innermost of the data, e.g. softmax over the last axis, layer
  norm, ``x.mean(-1)``): every block moves under one parallel loop over the rows, so a row is
  read while in cache; each reduction is split into vector-wide partial results (``rfactor``)
  that are combined at the end of the row (a partial last vector runs on its own, predicated),
  and the elementwise blocks are vectorized. Per-row intermediates stay on the stack; rows too
  wide for it are taken a few at a time per scratch allocation.
- **columns** (a reduced axis is outside a kept one, e.g. NHWC global average pooling,
  ``x.mean(1)`` of ``(B, N, C)``, softmax over NCHW channels): each block on its own, the
  contiguous kept axis split into vectors and innermost, the reduced loops around it and the
  accumulators in registers, the other kept axes in parallel.

``exp`` inside these kernels is computed by TVM's vectorizable polynomial (see
:mod:`omnic.compile.rules.cpu.fastmath`) instead of a libm call per element.

Pooling blocks (a ``schedule_rule`` annotation) and matmul-like reductions (two operands varying
along the reduced axis) are left to their own rules.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from omnic.compile.rules.cpu.base import CPURule, num_cores, vector_lanes
from omnic.compile.rules.cpu.fastmath import use_fast_math

#: run a kernel's outer loop in parallel only when it touches at least this many elements (the
#: fork/join of the thread pool costs microseconds)
PARALLEL_MIN_ELEMENTS = 8192
#: split a reduction into vector-wide partial results when it is at least this many vectors long
RFACTOR_MIN_VECTORS = 2
#: TVM allocates a constant-size scratch buffer on the stack only below this many bytes (else
#: from the workspace pool, a call each time); a "local" buffer always goes to the pool, so
#: every intermediate here stays in "global" scope
STACK_BYTES = 1024
#: rows of intermediates too wide for the stack are computed this many bytes at a time
CHUNK_BYTES = 16384
#: vectorize a contiguous loop whole (a wide vector LLVM splits) up to this many vectors
WHOLE_VECTOR_MAX = 4


def _var_positions(indices, iter_vars) -> list[int | None]:
    """For each index, the position of the block iterator it is (None for anything else)."""
    out = []
    for idx in indices:
        out.append(next((i for i, iv in enumerate(iter_vars) if iv.var.same_as(idx)), None))
    return out


def _uses(expr, variables) -> bool:
    """Whether ``expr`` mentions any of ``variables``."""
    if isinstance(expr, tvm.ir.expr.Var):
        return any(expr.same_as(v) for v in variables)
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, field, None)
        if child is not None and not isinstance(child, (int, float)) and _uses(child, variables):
            return True
    for field in ("args", "indices"):
        for child in getattr(expr, field, None) or ():
            if _uses(child, variables):
                return True
    return False


def _varying_reads(block: s_tir.SBlock, red_pos: set[int]) -> list:
    """The read regions of ``block`` whose indices use a reduction iterator."""
    red_vars = [block.iter_vars[i].var for i in red_pos]
    return [region for region in block.reads
            if any(_uses(rng.min, red_vars) for rng in region.region)]


def _kinds(block: s_tir.SBlock) -> list[int]:
    return [int(iv.iter_type) for iv in block.iter_vars]


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) or hasattr(value, "value") else None


def _is_inner(block: s_tir.SBlock) -> bool | None:
    """Whether the block reduces along the innermost dimension of the data it reads (None: not
    a reduction this rule schedules: several operands vary with the reduced axes, or indices
    are not plain iterators)."""
    kinds = _kinds(block)
    red = {i for i, k in enumerate(kinds) if k == 2}
    reads = _varying_reads(block, red)
    if len(reads) != 1:
        return None
    region = reads[0].region
    last = _var_positions([region[-1].min], block.iter_vars)[0]
    if last is None:
        return None
    return last in red


def _elements(func: tirx.PrimFunc) -> int:
    total = 0
    for param in func.params:
        n = 1
        for dim in getattr(param, "shape", ()):
            n *= int(dim) if isinstance(dim, tirx.IntImm) or hasattr(dim, "value") else 1
        total = max(total, n)
    return total


class ReductionRule(CPURule):
    """Row-parallel, vectorized schedules of softmax / normalization / reduction kernels."""

    name = "reduction"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        blocks = [sch.get(info.block_rv) for info in infos]
        if any("schedule_rule" in b.annotations for b in blocks):
            return None
        if any(k not in (0, 2) for b in blocks for k in _kinds(b)):
            return None
        reductions = [b for b in blocks if 2 in _kinds(b)]
        if not reductions:
            return None
        inner = [_is_inner(b) for b in reductions]
        if any(i is None for i in inner):
            return None
        if any(str(w.source.dtype) != "float32" for b in blocks for w in b.writes):
            return None
        use_fast_math(sch, _root_blocks(sch))
        _inline_single_use(sch)
        for block in _root_blocks(sch):
            if not sch.get_loops(block):  # a scalar step: rfactor next to a loopless block fails
                sch.add_unit_loop(block)
        parallel = num_cores(target) > 1 and _elements(func) >= PARALLEL_MIN_ELEMENTS
        lanes = vector_lanes(target, "float32")
        # where the reduced axes lie, after inlining (an inlined transpose moves them)
        inner = [_is_inner(sch.get(b)) for b in _root_blocks(sch) if 2 in _kinds(sch.get(b))]
        if all(inner):
            rows = sch.copy()
            try:
                if _schedule_rows(rows, lanes, parallel):
                    return rows
            except Exception:  # noqa: BLE001, S110 - a kernel the row schedule does not fit: per block
                pass
        _schedule_blocks(sch, lanes, parallel)
        return sch


# ----------------------------------------------------------------------------- helpers
def _root_blocks(sch: s_tir.Schedule) -> list:
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    return list(sch.get_child_blocks(root))


def _output_buffers(sch: s_tir.Schedule) -> list:
    return list(sch.mod["main"].params)


def _writes_output(sch: s_tir.Schedule, block) -> bool:
    params = _output_buffers(sch)
    return any(p.same_as(w.source) for w in sch.get(block).writes for p in params)


def _inline_single_use(sch: s_tir.Schedule) -> None:
    """Inline each elementwise block that feeds exactly one block: nothing is computed twice and
    one pass over memory goes."""
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            stmt = sch.get(block)
            if 2 in _kinds(stmt) or _writes_output(sch, block):
                continue
            if len(sch.get_consumers(block)) != 1:
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # noqa: BLE001, S112 - not inlinable (e.g. a non-trivial layout): keep it
                continue
    # an elementwise tail (a broadcast_to or reshape after the last step) into its producer
    blocks = _root_blocks(sch)
    last = blocks[-1]
    if 2 not in _kinds(sch.get(last)) and len(blocks) > 1:
        producers = sch.get_producers(last)
        if len(producers) == 1 and 2 not in _kinds(sch.get(producers[0])):
            try:
                sch.reverse_compute_inline(last)
            except Exception:  # noqa: BLE001, S110 - keep the tail as its own loop
                pass


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int, below=None) -> None:
    """Vectorize the block's innermost loop (split into vectors when long); with ``below``, only
    a loop inside that one (a block computed at a row loop may have no loop of its own)."""
    loops = sch.get_loops(block)
    if below is not None:
        outer = sch.get(below)
        at = next((i for i, lp in enumerate(loops) if sch.get(lp).same_as(outer)), None)
        loops = loops[at + 1:] if at is not None else []
    if not loops:
        return
    inner = loops[-1]
    n = _extent(sch, inner)
    if n is None or n < 2:
        return
    if n % lanes == 0 and n > lanes:
        _, inner = sch.split(inner, [None, lanes])
    elif n > WHOLE_VECTOR_MAX * lanes:
        return  # a long odd loop: LLVM's own loop vectorizer gets it as a plain loop
    sch.vectorize(inner)


def _rfactor(sch: s_tir.Schedule, block, lanes: int):
    """Split ``block``'s (fused) innermost reduction into ``lanes`` partial results.

    Returns ``(rf_block, final_block)`` or None when the reduction is too short to gain.
    """
    loops = sch.get_loops(block)
    kinds = _kinds(sch.get(block))
    red_loops = loops[len(loops) - sum(1 for k in kinds if k == 2):]
    total = 1
    for lp in red_loops:
        n = _extent(sch, lp)
        if n is None:
            return None
        total *= n
    if total < RFACTOR_MIN_VECTORS * lanes:
        return None
    red = sch.fuse(*red_loops) if len(red_loops) > 1 else red_loops[0]
    _, ki = sch.split(red, [None, lanes])
    rf = sch.rfactor(ki, len(sch.get(block).writes[0].region))
    return rf, block, (0 if total % lanes == 0 else total)


# ----------------------------------------------------------------------------- rows
def _leading_spatial(kinds: list[int]) -> int:
    n = 0
    for k in kinds:
        if k != 0:
            break
        n += 1
    return n


def _schedule_rows(sch: s_tir.Schedule, lanes: int, parallel: bool) -> bool:
    """Every block under one (parallel) loop over the rows the blocks share; False when the
    kernel has no such rows (then nothing was changed)."""
    blocks = _root_blocks(sch)
    lead = min(_leading_spatial(_kinds(sch.get(b))) for b in blocks)
    if lead < 1 or 2 in _kinds(sch.get(blocks[-1])):
        return False
    # the partial sums first: rfactor needs the reduction's own loop nest
    rf_names, final_names = {}, set()
    for block in blocks:
        if 2 in _kinds(sch.get(block)):
            pair = _rfactor(sch, block, lanes)
            if pair is not None:
                rf_names[sch.get(pair[0]).name_hint] = pair[2]
                final_names.add(sch.get(pair[1]).name_hint)
    blocks = _root_blocks(sch)
    loops = sch.get_loops(blocks[-1])
    row = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
    # a row-sized intermediate (softmax's exp) too big for the stack comes from the workspace
    # pool, a call per allocation: compute a few rows per allocation
    widest = max([_row_bytes(sch, b, lead) for b in blocks[:-1] if 2 not in _kinds(sch.get(b))] or [0])
    rows = _extent(sch, row) or 1
    per_chunk = max(1, CHUNK_BYTES // max(1, widest))
    if widest >= STACK_BYTES and per_chunk > 1 and rows >= 2 * per_chunk:
        row, _ = sch.split(row, [None, per_chunk])
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, row, preserve_unit_loops=False)
    if parallel and (_extent(sch, row) or 0) > 1:
        sch.parallel(row)
    tails = []
    for block in _root_blocks_under(sch, row):
        name = sch.get(block).name_hint
        if name in rf_names:
            tails.append(_vectorize_rf(sch, block, lanes, rf_names[name]))
        elif name in final_names:  # the vector of partial results: a short unrolled loop
            sch.unroll(sch.get_loops(block)[-1])
        elif 2 in _kinds(sch.get(block)):
            pass  # too short to split: LLVM unrolls it
        else:
            _vectorize_inner(sch, block, lanes, below=row)
    for split_tail in tails:
        if split_tail is not None:
            split_tail()
    return True


def _row_bytes(sch: s_tir.Schedule, block, lead: int) -> int:
    """Bytes the block writes per row (its iterators after the ``lead`` row iterators)."""
    stmt = sch.get(block)
    n = 1
    for iv in stmt.iter_vars[lead:]:
        n *= int(iv.dom.extent)
    return n * tvm.runtime.DataType(str(stmt.writes[0].source.dtype)).bits // 8


def _vectorize_rf(sch: s_tir.Schedule, rf, lanes: int, total: int):
    """The partial-result block of an rfactor: its vector axis innermost and vectorized.

    rfactor makes the vector axis the block's first iterator, so the loops compute_at creates
    run it outside the reduction; put it inside. ``total``: the reduced length when it is not a
    whole number of vectors (0 otherwise), whose bound compute_at drops and this restores.

    Returns a callable that splits off the last, partial vector of such a reduction (so the
    whole vectors run unpredicated); call it once no other block needs scheduling, since the
    split wraps the loop in blocks of its own. None when there is nothing to split.
    """
    kinds = _kinds(sch.get(rf))
    values = _binding(sch, rf)
    loops = sch.get_loops(rf)

    def loop_of(value):
        return next(lp for lp in loops if sch.get(lp).loop_var.same_as(value))

    vec = loop_of(values[0])  # the rfactor axis
    red = loop_of(values[kinds.index(2)])
    if total:
        _restore_bound(sch, rf, values[kinds.index(2)] * lanes + values[0] < total)
    sch.reorder(red, vec)
    sch.vectorize(vec)
    sch.decompose_reduction(rf, red)
    whole = total // lanes
    if not total or not whole:
        return None
    return lambda: sch.loop_partition(red, [whole, None])


def _restore_bound(sch: s_tir.Schedule, block, bound) -> None:
    """Make ``bound`` the predicate of ``block``'s realize where compute_at dropped it.

    compute_at regenerates an rfactor block's loops over its whole iteration domain and loses the
    predicate of a split that does not divide the reduction (the last vector would read past
    the row); TVM 0.27 has no primitive to put it back, so the realize is rebuilt.
    """
    _binding(sch, block)  # checks the realize is the loop's body
    loop = sch.get_loops(block)[-1]
    stmt = sch.get(loop)
    realize = stmt.body
    if not _is_true(realize.predicate):
        return  # not moved by compute_at: rfactor's own predicate is still there
    predicate = bound
    new_realize = s_tir.SBlockRealize(realize.iter_values, predicate, realize.block)
    new_loop = tirx.stmt.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, new_realize,
                             stmt.thread_binding, stmt.annotations, stmt.step)
    sch.state.replace(sch.get_sref(loop), new_loop, {realize.block: realize.block})


def _is_true(expr) -> bool:
    return hasattr(expr, "value") and bool(expr.value)


def _binding(sch: s_tir.Schedule, block) -> list:
    """The block's iterator values (the block must be alone in its innermost loop)."""
    realize = sch.get(sch.get_loops(block)[-1]).body
    if not isinstance(realize, s_tir.SBlockRealize) or not realize.block.same_as(sch.get(block)):
        raise ValueError(f"{sch.get(block).name_hint} is not alone in its innermost loop")
    return list(realize.iter_values)


def _root_blocks_under(sch: s_tir.Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))


def _all_blocks(sch: s_tir.Schedule) -> list:
    out = []

    def visit(block):
        for child in sch.get_child_blocks(block):
            out.append(child)
            visit(child)

    visit(sch.get_sblock(sch.mod["main"].body.block.name_hint))
    return out


# ----------------------------------------------------------------------------- columns
def _schedule_blocks(sch: s_tir.Schedule, lanes: int, parallel: bool) -> None:
    """Each block on its own; an elementwise block right after a reduction (a mean's division,
    a residual add) moves into the reduction's parallel loop and reads its result there."""
    names = [sch.get(b).name_hint for b in _root_blocks(sch)]
    done = set()
    for name in names:
        if name in done:
            continue
        block = sch.get_sblock(name)
        stmt = sch.get(block)
        if 2 not in _kinds(stmt):
            _elementwise(sch, block, lanes, parallel)
            continue
        consumers = sch.get_consumers(block)
        follower = None
        if not _writes_output(sch, block) and len(consumers) == 1 and 2 not in _kinds(sch.get(consumers[0])):
            follower = consumers[0]
        if _is_inner(stmt) is not False:
            outer = _one_row_reduction(sch, block, lanes, parallel)
        else:
            outer = _column_reduction(sch, block, lanes, parallel, follower is None)
        if follower is not None and outer is not None:
            follower_name = sch.get(follower).name_hint
            try:
                sch.reverse_compute_at(follower, outer, preserve_unit_loops=True)
                _vectorize_inner(sch, follower, lanes, below=outer)
                done.add(follower_name)
            except Exception:  # noqa: BLE001, S110 - the follower reads more than the loop makes: own loop
                pass


def _parallel_outer(sch: s_tir.Schedule, loops: list, parallel: bool):
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if parallel and (_extent(sch, fused) or 0) > 1:
        sch.parallel(fused)
    return fused


def _elementwise(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    loops = sch.get_loops(block)
    if len(loops) > 1:
        _parallel_outer(sch, loops[:-1], parallel)
    _vectorize_inner(sch, block, lanes)


def _one_row_reduction(sch: s_tir.Schedule, block, lanes: int, parallel: bool):
    """A reduction along contiguous data, alone: rows in parallel, vector partial results.
    Returns the row loop (None when there is none)."""
    pair = _rfactor(sch, block, lanes)
    if pair is None:
        loops = sch.get_loops(block)
        spatial = loops[:len(loops) - sum(1 for k in _kinds(sch.get(block)) if k == 2)]
        return _parallel_outer(sch, spatial, parallel)
    rf, final, total = pair
    loops = sch.get_loops(final)
    n_spatial = sum(1 for k in _kinds(sch.get(final)) if k == 0)
    row = _parallel_outer(sch, loops[:n_spatial], parallel)
    if row is not None:
        sch.compute_at(rf, row, preserve_unit_loops=False)
    split_tail = _vectorize_rf(sch, rf, lanes, total)
    if split_tail is not None:
        split_tail()
    return row


def _column_reduction(sch: s_tir.Schedule, block, lanes: int, parallel: bool, cache: bool):
    """Reduce over outer axes with the contiguous kept axis in vectors, innermost; returns the
    parallel loop over the kept axes (None when there is none). ``cache``: accumulate in a
    vector-sized scratch buffer written back per vector (for a reduction that writes the
    kernel's output; an intermediate is compacted to that size by its consumer moving in)."""
    stmt = sch.get(block)
    kinds = _kinds(stmt)
    loops = sch.get_loops(block)
    red = {i for i, k in enumerate(kinds) if k == 2}
    region = _varying_reads(stmt, red)[0].region
    vec_at = _var_positions([region[-1].min], stmt.iter_vars)[0]
    spatial = [lp for lp, k in zip(loops, kinds) if k == 0]
    reduce_loops = [lp for lp, k in zip(loops, kinds) if k == 2]
    vec_loop = loops[vec_at]
    n = _extent(sch, vec_loop) or 1
    if n % lanes == 0 and n > lanes:
        vo, vi = sch.split(vec_loop, [None, lanes])
        outer = [lp for lp in spatial if lp != vec_loop] + [vo]
    else:
        vi = vec_loop
        outer = [lp for lp in spatial if lp != vec_loop]
    sch.reorder(*outer, *reduce_loops, vi)
    fused = _parallel_outer(sch, outer, parallel)
    if cache and fused is not None:
        # accumulate a vector of the kept axis in registers over all reduced elements
        acc = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(acc, fused, preserve_unit_loops=True)
        _vectorize_inner(sch, acc, lanes, below=fused)
    if n <= WHOLE_VECTOR_MAX * lanes or n % lanes == 0:
        sch.vectorize(vi)
    sch.decompose_reduction(block, reduce_loops[0])
    return fused
