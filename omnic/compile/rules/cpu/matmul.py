"""Default CPU schedule of dense layers, matmuls and batch matmuls (fp32).

A kernel is one einsum block ``C[b.., i.., j] += A[.., i, .., k] * B[.., k, .., j]`` (any order of
the indices, batch indices in both operands, ``B`` possibly a constant weight) with an optional
elementwise prologue (inlined) and epilogue (bias, activation, residual add; fused at the tile).

The schedule is the classic register-tiled GEMM: ``mr`` rows of ``C`` by ``nr`` columns (one or a
few vectors) are accumulated in registers while ``k`` runs outside the tile, the ``A`` values are
broadcast and the ``B`` row is loaded as vectors. A constant weight that the kernel lists in
``layout_free_buffers`` is re-laid out as ``[j // nr, k, j % nr]`` (zero padded to whole tiles) by a
block marked as layout-rewrite preprocessing, which the build folds into a new constant, so each
tile streams its weight panel contiguously. Tiles run in parallel, columns outermost so that a
weight panel stays in cache while every row block uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad as BufferLoad
from tvm.s_tir.dlight.analysis import normalize_prim_func

from omnic.compile.rules.cpu.base import CPURule, num_cores, vector_bits, vector_lanes
from omnic.compile.rules.cpu.fastmath import use_fast_math

#: annotation that marks a block as weight re-layout, split out and folded at build time
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"
#: largest register tile height
MAX_ROWS = 8
#: run in parallel only from this many multiply-adds (the thread pool's fork/join costs microseconds)
PARALLEL_MIN_MACS = 1 << 16
#: TVM allocates a constant-size scratch buffer on the stack only below this many bytes (else
#: from the workspace pool, a call per tile)
STACK_BYTES = 1024
#: fewest tile heights tried for the row remainder (the height that wastes fewest padded rows wins)
MIN_ROWS = 4


@dataclass(frozen=True, kw_only=True)
class MatmulTile:
    """The register tile of one matmul kernel.

    Attributes:
        rows: Rows of ``C`` per tile (``mr``).
        cols: Columns of ``C`` per tile (``nr``), a multiple of the vector lanes.
        lanes: fp32 lanes per vector register.
        parallel_rows: Whether the row tiles join the column tiles in the parallel loop (when the
            column tiles alone are too few to share among the cores).
    """

    rows: int
    cols: int
    lanes: int
    parallel_rows: bool


@dataclass(frozen=True, kw_only=True)
class _Einsum:
    """Which iterators of the matmul block are batch, row (``i``), column (``j``) and ``k``."""

    batch: tuple[int, ...]
    rows: tuple[int, ...]
    col: int
    red: int
    a_index: int  # read-region index of the operand without j
    b_index: int  # read-region index of the operand with j
    b_buffer: tirx.Buffer
    extents: tuple[int, ...]


def _index_vars(indices, iter_vars) -> list[int] | None:
    """Positions in ``iter_vars`` of plain-variable indices (None if any index is an expression)."""
    out = []
    for idx in indices:
        if isinstance(idx, tirx.IntImm):
            continue
        match = [i for i, iv in enumerate(iter_vars) if iv.var.same_as(idx)]
        if not match:
            return None
        out.append(match[0])
    return out


def _match_einsum(block: s_tir.SBlock) -> _Einsum | None:
    """The roles of ``block``'s iterators, or None when it is not an fp32 matmul."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or len(block.writes) != 1:
        return None
    if str(store.buffer.dtype) != "float32" or not isinstance(store.value, tirx.Add):
        return None
    lhs, rhs = store.value.a, store.value.b
    if not (isinstance(lhs, BufferLoad) and lhs.source.same_as(store.buffer)):
        return None
    while isinstance(rhs, tirx.Cast):
        rhs = rhs.value
    if not isinstance(rhs, tirx.Mul):
        return None
    operands = []
    for side in (rhs.a, rhs.b):
        while isinstance(side, tirx.Cast):
            side = side.value
        if not isinstance(side, BufferLoad):
            return None
        operands.append(side)
    ivs = block.iter_vars
    c_vars = _index_vars(store.indices, ivs)
    a_vars, b_vars = (_index_vars(op.indices, ivs) for op in operands)
    if c_vars is None or a_vars is None or b_vars is None or not c_vars:
        return None
    reds = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == 2]
    if len(reds) != 1 or any(int(iv.iter_type) not in (0, 2) for iv in ivs):
        return None
    red = reds[0]
    if red not in a_vars or red not in b_vars:
        return None
    col = c_vars[-1]  # the output's contiguous dimension is the vectorized one
    if col in a_vars and col in b_vars:
        return None  # a batch index innermost: not a matmul worth tiling
    if col in a_vars:  # name the operand with j "B"
        operands.reverse()
        a_vars, b_vars = b_vars, a_vars
    if col not in b_vars:
        return None
    batch = tuple(i for i in c_vars if i in a_vars and i in b_vars)
    rows = tuple(i for i in c_vars if i in a_vars and i not in b_vars)
    if set(batch) | set(rows) | {col} != set(c_vars) or len(set(c_vars)) != len(c_vars):
        return None
    if any(i not in c_vars and i != red for i in set(a_vars) | set(b_vars)):
        return None
    region_buffers = [r.source for r in block.reads]
    try:
        a_index = next(n for n, b in enumerate(region_buffers) if b.same_as(operands[0].source))
        b_index = next(n for n, b in enumerate(region_buffers) if b.same_as(operands[1].source))
    except StopIteration:
        return None
    if a_index == b_index:
        return None
    extents = []
    for iv in ivs:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        extents.append(int(iv.dom.extent))
    return _Einsum(batch=batch, rows=rows, col=col, red=red, a_index=a_index, b_index=b_index,
                   b_buffer=operands[1].source, extents=tuple(extents))


def _registers(target: tvm.target.Target) -> int:
    # AVX-512 and AArch64 NEON have 32 vector registers, AVX2/SSE 16
    if vector_bits(target) >= 512 or "aarch64" in str(target.attrs.get("mtriple", "")):
        return 32
    return 16


def choose_tile(m: int, n: int, batch: int, target: tvm.target.Target) -> MatmulTile:
    """The register tile for an ``m x n`` output (``batch`` of them) on ``target``."""
    lanes = vector_lanes(target, "float32")
    regs = _registers(target)
    if m == 1:  # a vector times a matrix: only the column vectors give independent FMA chains
        vectors = 4 if n >= 4 * lanes else 2 if n > lanes else 1
    else:
        vectors = 2 if n > lanes else 1
    cols = vectors * lanes
    # accumulators + the B vectors + one broadcast A value must fit the register file
    max_rows = max(1, min(MAX_ROWS, (regs - vectors - 1) // vectors, (STACK_BYTES - 1) // (4 * cols)))
    if m <= max_rows:
        rows = m
    else:
        candidates = range(max_rows, min(MIN_ROWS, max_rows) - 1, -1)
        rows = min(candidates, key=lambda r: (-(-m // r) * r - m, -r))
    col_tiles = batch * -(-n // cols)
    cores = num_cores(target)
    parallel_rows = cores > 1 and col_tiles % cores != 0 and col_tiles < 4 * cores
    return MatmulTile(rows=rows, cols=cols, lanes=lanes, parallel_rows=parallel_rows)


def _layout_free(func: tirx.PrimFunc, buffer: tirx.Buffer) -> bool:
    attrs = func.attrs
    free = attrs.get("layout_free_buffers", None) if attrs is not None else None
    if not free:
        return False
    # 0.27 PrimFuncs take their buffers as params
    return any(func.params[int(index)].same_as(buffer) for index in free)


class MatmulRule(CPURule):
    """Register-tiled fp32 dense / matmul / batch-matmul kernels with their fused epilogue."""

    name = "matmul"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        for info in infos:
            if "schedule_rule" in sch.get(info.block_rv).annotations:
                return None
        reductions = [n for n, info in enumerate(infos) if info.is_reduction() or not info.is_injective()]
        if len(reductions) != 1:
            return None
        at = reductions[0]
        block = infos[at].block_rv
        einsum = _match_einsum(sch.get(block))
        if einsum is None:
            return None
        if any(not info.is_injective() for info in infos[at + 1:]):
            return None
        if at:  # a prologue (e.g. a transpose): read in place if the block stays an einsum
            inlined = sch.copy()
            for info in reversed(infos[:at]):
                inlined.compute_inline(info.block_rv)
            again = _match_einsum(inlined.get(block))
            if again is not None:
                sch, einsum = inlined, again
            else:  # (e.g. a dequantized weight) computed on its own before the matmul
                for info in infos[:at]:
                    _schedule_copy(sch, info.block_rv, target)
        use_fast_math(sch, [i.block_rv for i in infos[at + 1:]])  # a GELU epilogue's erf
        return _schedule(sch, func, block, einsum, [i.block_rv for i in infos[at + 1:]], target)


def _schedule(sch: s_tir.Schedule, func: tirx.PrimFunc, block, e: _Einsum, epilogue: list,
              target: tvm.target.Target) -> s_tir.Schedule:
    m = 1
    for i in e.rows:
        m *= e.extents[i]
    n = e.extents[e.col]
    batch = 1
    for i in e.batch:
        batch *= e.extents[i]
    tile = choose_tile(m, n, batch, target)
    weight = _layout_free(func, e.b_buffer)

    # pad j to whole column tiles and i to whole row tiles: every tile then computes full
    # vectors on unconditional accumulators (a row predicate keeps them out of registers)
    padding = [1] * len(e.extents)
    if n % tile.cols:
        padding[e.col] = tile.cols
    if len(e.rows) == 1 and m % tile.rows:
        padding[e.rows[0]] = tile.rows
    b_pack = None
    if any(p > 1 for p in padding):
        a_buf, b_buf = (sch.get(block).reads[x].source for x in (e.a_index, e.b_index))
        sch.pad_einsum(block, padding)
        reads = sch.get(block).reads
        for producer in sch.get_producers(block):
            written = sch.get(producer).writes[0].source
            if written.same_as(reads[e.b_index].source) and not written.same_as(b_buf):
                b_pack = producer
            elif written.same_as(reads[e.a_index].source) and not written.same_as(a_buf):
                sch.compute_inline(producer)  # the zero rows: a select on the A value
        epilogue = _blocks_after(sch, block)
    b_region = sch.get(block).reads[e.b_index]
    b_vars = _index_vars([r.min for r in b_region.region], sch.get(block).iter_vars)
    if weight or (b_vars is not None and b_vars[-1] != e.col):
        if b_pack is None:
            b_pack = sch.cache_read(block, e.b_index, "global")
        if weight:
            sch.annotate(b_pack, LAYOUT_REWRITE_PREPROC, True)
        ndim = len(b_region.region)
        pos_k, pos_j = b_vars.index(e.red), b_vars.index(e.col)
        cols = tile.cols

        def packed(*idx):
            rest = [v for p, v in enumerate(idx) if p not in (pos_k, pos_j)]
            return [*rest, idx[pos_j] // cols, idx[pos_k], idx[pos_j] % cols]

        index_dtype = str(b_region.source.shape[0].ty.dtype)  # the map's variables must match the buffer's
        sch.transform_layout(block, ("read", e.b_index),
                             tirx.IndexMap.from_func(packed, ndim=ndim, index_dtype=index_dtype))
        if not weight:
            _schedule_copy(sch, b_pack, target)
    elif b_pack is not None:
        _schedule_copy(sch, b_pack, target)

    loops = sch.get_loops(block)
    batch_loops = [loops[i] for i in e.batch]
    row_loops = [loops[i] for i in e.rows]
    row = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0] if row_loops else None
    col, red = loops[e.col], loops[e.red]
    jo, ji = sch.split(col, [None, tile.cols])
    if row is not None:
        io, ii = sch.split(row, [None, tile.rows])
        sch.reorder(*batch_loops, jo, io, red, ii, ji)
    else:
        io = ii = None
        sch.reorder(*batch_loops, jo, red, ji)
    tile_loop = io if io is not None else jo

    # the accumulators: a tile-sized buffer the epilogue reads right after the k loop. It stays
    # in "global" scope: TVM puts a small constant-size global buffer on the stack (where LLVM
    # keeps it in registers) but allocates every "local" one from the workspace pool, a call
    # per tile
    last = None
    if epilogue:
        *inner, last = epilogue
        for b in inner:
            sch.compute_inline(b)
        try:
            sch.reverse_compute_at(last, tile_loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - an epilogue that reads across tiles (a reshape): own loop
            _schedule_copy(sch, last, target)
            last = None
    if last is None:
        last = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(last, tile_loop, preserve_unit_loops=True)
    sch.vectorize(ji)
    if ii is not None:
        sch.unroll(ii)
    tail = sch.get_loops(last)[len(batch_loops) + (2 if io is not None else 1):]
    if tail and n % tile.cols == 0:
        sch.vectorize(tail[-1])

    outer = [*batch_loops, jo] + ([io] if tile.parallel_rows and io is not None else [])
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if num_cores(target) > 1 and batch * m * n * e.extents[e.red] >= PARALLEL_MIN_MACS:
        sch.parallel(fused)
    # last: the primitives above need the reduction block whole
    sch.decompose_reduction(block, red)
    return sch


def _blocks_after(sch: s_tir.Schedule, block) -> list:
    """The root blocks after ``block``, in order."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    children = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in children]
    at = names.index(sch.get(block).name_hint)
    return list(children[at + 1:])


def _schedule_copy(sch: s_tir.Schedule, block, target: tvm.target.Target) -> None:
    """A per-call copy (padding or re-layout of an activation operand, an epilogue left on its
    own): its outer loops in parallel. The inner loop is left to LLVM: a padding copy reads
    under a condition that a TVM vector would evaluate for the padding lanes too."""
    loops = sch.get_loops(block)
    if len(loops) > 1 and num_cores(target) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
