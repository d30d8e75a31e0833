"""Default schedule of dense and grouped NHWC conv2d kernels (OHWI weights) and their epilogues.

The classic direct convolution: the weight is re-laid out so that a block of output channels is
innermost (``[O/t, KH, KW, I, t]``); the output is computed in register tiles of (a few output
pixels of one row) x (a few vectors of output channels) held in a local accumulator, the
reduction over (kh, kw, ci) running outside the tile with the pixel loop unrolled and the channel
loop vectorized; the parallel loop runs over (channel blocks x rows); and the fused epilogue
(bias, activation, residual add...) is applied to each tile while it is still in registers.

When the weight is a layout-free constant, its re-layout is marked as layout-rewrite
preprocessing, which the build splits out and folds at compile time.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.schedule import ScheduleError

from omnic.compile.rules.cpu.base import CPURule, num_cores, vector_bits, vector_lanes

#: the names TOPI gives the reduction block of an NHWC conv2d
CONV_BLOCKS = ("conv2d_nhwc", "group_conv2d_nhwc")
#: block annotation the build's SplitLayoutRewritePreproc looks for
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"
#: multiply-adds below which a conv runs on one thread (waking the pool costs microseconds)
PARALLEL_MIN_MACS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class ConvInfo:
    """What the schedule needs to know of one conv kernel (all from its conv block)."""

    batch: int
    out_h: int
    out_w: int
    out_c: int
    kernel_h: int
    kernel_w: int
    in_c_per_group: int
    groups: int
    weight: tirx.Buffer
    weight_param: int | None  # position of the weight among the PrimFunc's params

    @property
    def out_c_per_group(self) -> int:
        return self.out_c // self.groups

    @property
    def macs(self) -> int:
        return (self.batch * self.out_h * self.out_w * self.out_c * self.kernel_h * self.kernel_w
                * self.in_c_per_group)


@dataclass(frozen=True, kw_only=True)
class Tile:
    """The register tile: ``width`` output pixels of a row by ``blocks`` vectors of ``vector``
    output channels each."""

    width: int
    vector: int
    blocks: int

    @property
    def channels(self) -> int:
        return self.vector * self.blocks


def _int(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _analyse(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, func: tirx.PrimFunc) -> ConvInfo | None:
    stmt = sch.get(block)
    if len(stmt.iter_vars) != 7 or len(stmt.writes) != 1 or len(stmt.reads) != 2 or stmt.init is None:
        return None
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 3:
        return None
    if str(stmt.writes[0].source.dtype) != "float32":
        return None
    dims = [_int(iv.dom.extent) for iv in stmt.iter_vars]
    if any(d is None for d in dims) or any(_int(iv.dom.min) != 0 for iv in stmt.iter_vars):
        return None
    n, oh, ow, oc, kh, kw, ic = dims
    ivars = [iv.var for iv in stmt.iter_vars]
    weight_index, data = None, None
    for i, region in enumerate(stmt.reads):
        mins = [r.min for r in region.region]
        if len(mins) == 4 and all(isinstance(m, tirx.Var) and m.same_as(v)
                                  for m, v in zip(mins, (ivars[3], ivars[4], ivars[5], ivars[6]))):
            weight_index = i
        else:
            data = region.source
    if weight_index is None or data is None or len(data.shape) != 4:
        return None
    weight = stmt.reads[weight_index].source
    if [_int(d) for d in weight.shape] != [oc, kh, kw, ic]:
        return None
    in_c = _int(data.shape[3])
    if in_c is None or in_c % ic:
        return None
    groups = in_c // ic
    if groups > 1 and ic == 1:
        return None  # depthwise: not this rule's kernel
    if oc % groups:
        return None
    weight_param = None
    for p, param in enumerate(func.params):
        if param.same_as(weight):
            weight_param = p
    return ConvInfo(batch=n, out_h=oh, out_w=ow, out_c=oc, kernel_h=kh, kernel_w=kw, in_c_per_group=ic,
                    groups=groups, weight=weight, weight_param=weight_param)


def _choose_channels(per_group: int, lanes: int) -> tuple[int, int]:
    """``(vector, blocks)`` of output channels in the tile, dividing the group's channels.

    The vector is the widest power of two up to the target's lanes that divides the channels:
    LLVM splits odd vector lengths into scalar code, so 24 channels on 16 lanes are three 8-lane
    vectors rather than a 16 and an 8. Several vectors per tile let each input value loaded
    feed several FMAs; two are preferred, then three, then one (or up to six narrow ones).
    """
    vector = 1
    while vector * 2 <= lanes and per_group % (vector * 2) == 0:
        vector *= 2
    count = per_group // vector
    prefer = (2, 3, 1) if vector == lanes else (3, 4, 2, 6, 5, 1)
    blocks = next(b for b in prefer if count % b == 0)
    return vector, blocks


def _choose_width(out_w: int, blocks: int, registers: int) -> int:
    """Output pixels of the tile: as many as leave registers for the weights, dividing the row."""
    cap = max(1, (registers - blocks - 2) // blocks)
    if out_w <= cap:
        return out_w
    divisors = [d for d in range(cap, 0, -1) if out_w % d == 0]
    if divisors and divisors[0] * 2 > cap:
        return divisors[0]
    return cap  # no good divisor: the last tile of a row is partial


def choose_tile(info: ConvInfo, target: tvm.target.Target) -> Tile:
    """The register tile of ``info`` on ``target``."""
    lanes = vector_lanes(target, "float32")
    # AVX-512 and AArch64 have 32 vector registers, AVX2 and SSE 16
    registers = 32 if vector_bits(target) == 512 or "aarch64" in str(target.attrs.get("mtriple", "")) else 16
    vector, blocks = _choose_channels(info.out_c_per_group, lanes)
    return Tile(width=_choose_width(info.out_w, blocks, registers), vector=vector, blocks=blocks)


def _find_conv(sch: s_tir.Schedule) -> s_tir.schedule.SBlockRV | None:
    found = None
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in stmt.iter_vars):
            if found is not None or stmt.name_hint not in CONV_BLOCKS:
                return None  # a second reduction: not a plain conv kernel
            found = block
    return found


def _is_copy(sch: s_tir.Schedule, block) -> bool:
    """Whether ``block`` only copies (a padding of zero width): inlining it costs nothing."""
    stmt = sch.get(block)
    return isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tvm.ir.TensorLoad)


def _is_layout_free(func: tirx.PrimFunc, param: int | None) -> bool:
    attrs = func.attrs
    free = attrs.get("layout_free_buffers", None) if attrs is not None else None
    return param is not None and free is not None and any(int(i) == param for i in free)


def _pack_weight(sch: s_tir.Schedule, conv, info: ConvInfo, tile: Tile, constant: bool) -> None:
    t = tile.channels
    # found again: inlining the padding may have moved the weight among the reads
    index = next(i for i, region in enumerate(sch.get(conv).reads) if region.source.same_as(info.weight))
    packed = sch.cache_read(conv, index, "global")
    sch.transform_layout(conv, ("read", index), lambda o, h, w, i: (o // t, h, w, i, o % t))
    if constant:
        sch.annotate(packed, LAYOUT_REWRITE_PREPROC, True)
    else:
        # a weight computed at run time is packed on every call, which costs 1/(OH*OW) of the conv
        sch.parallel(sch.get_loops(packed)[0])


def _schedule_injective(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    """Parallel outer loops, vectorized inner loop (for blocks left outside the tile)."""
    loops = sch.get_loops(block)
    if len(loops) > 1 and parallel:
        sch.parallel(sch.fuse(*loops[:-1]))
    inner = sch.get(loops[-1])
    extent = _int(inner.extent)
    if extent is not None and extent % lanes == 0:
        _, vec = sch.split(loops[-1], [None, lanes])
        sch.vectorize(vec)


def _schedule(func: tirx.PrimFunc, target: tvm.target.Target, fuse_epilogue: bool) -> s_tir.Schedule | None:
    sch = s_tir.Schedule(func)
    conv = _find_conv(sch)
    if conv is None:
        return None
    info = _analyse(sch, conv, func)
    if info is None:
        return None
    lanes = vector_lanes(target, "float32")
    tile = choose_tile(info, target)
    root = sch.get_sblock("root")
    blocks = list(sch.get_child_blocks(root))
    conv_pos = [sch.get(b).name_hint for b in blocks].index(sch.get(conv).name_hint)
    producers = blocks[:conv_pos]
    consumers = blocks[conv_pos + 1:]

    # the padding of the input is materialised once, outside the tiles (read through, it costs
    # a bounds check per load and LLVM then keeps the accumulators in memory), except for convs
    # with few input channels, which do not amortise that pass over the input (nor vectorise it)
    read_through = info.in_c_per_group < lanes
    pads = []
    for block in reversed(producers):
        if read_through or _is_copy(sch, block):
            try:
                sch.compute_inline(block)
                continue
            except ScheduleError:
                pass
        pads.append(block)

    _pack_weight(sch, conv, info, tile, _is_layout_free(func, info.weight_param))

    # the epilogue: inline every intermediate step into the block(s) writing the output
    outputs = []
    for block in consumers:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            outputs.append(block)

    n, h, w, f, rh, rw, rc = sch.get_loops(conv)
    wo, wi = sch.split(w, [None, tile.width])
    per_group = info.out_c_per_group
    if info.groups > 1:
        g, fo, fi = sch.split(f, [info.groups, per_group // tile.channels, tile.channels])
        outer = [n, g, fo, h]
    else:
        fo, fi = sch.split(f, [None, tile.channels])
        outer = [n, fo, h]
    fk, fv = sch.split(fi, [tile.blocks, tile.vector])
    sch.reorder(*outer, wo, rh, rw, rc, wi, fk, fv)
    # each task of the parallel loop is one row of register tiles, channel blocks outermost so
    # that a thread keeps to the weights of its blocks (the tiles of a row stay a serial loop:
    # fused into the parallel loop, convs reading through their padding ran 3x slower); a conv
    # too small to amortise waking the thread pool runs on one thread
    par = sch.fuse(*outer)
    parallel = num_cores(target) > 1 and info.macs >= PARALLEL_MIN_MACS
    if parallel:
        sch.parallel(par)
    for block in pads:
        _schedule_injective(sch, block, lanes, parallel)

    def at_tile(block) -> None:
        sch.reverse_compute_at(block, wo, preserve_unit_loops=True)
        ep_w, ep_f = sch.get_loops(block)[-2:]
        ep_k, ep_v = sch.split(ep_f, [tile.blocks, tile.vector])
        sch.vectorize(ep_v)
        sch.unroll(ep_k)
        sch.unroll(ep_w)

    if outputs and fuse_epilogue and len(outputs) == 1:
        # the accumulator lives in registers; the epilogue reads it there
        sch.set_scope(conv, 0, "local")
        at_tile(outputs[0])
    else:
        at_tile(sch.cache_write(conv, 0, "local"))
        for block in outputs:
            _schedule_injective(sch, block, lanes, parallel)

    sch.unroll(wi)
    sch.unroll(fk)
    sch.vectorize(fv)
    sch.decompose_reduction(conv, rh)
    return sch


class Conv2dNHWC(CPURule):
    """Dense and grouped (several input channels per group) fp32 NHWC/OHWI conv2d."""

    name = "conv2d_nhwc"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target):
        try:
            return _schedule(func, target, fuse_epilogue=True)
        except ScheduleError:
            # an epilogue that will not go under the tile: schedule it on its own
            return _schedule(func, target, fuse_epilogue=False)
