"""The last default rule: a kernel no other rule took still runs on every core.

It inlines the spatial blocks it can (as the injective rule does: padding into a reduction, the
elementwise steps of a softmax or a norm into each other), gives each block left that is all
spatial the injective rule's schedule, and fuses the spatial loops that lead each other block (a
reduction) into one parallel loop, in front of its reduction loops. A kernel dlight's analysis
cannot read (blocks nested in blocks, as an adaptive pool with uneven windows lowers to) gets the
same parallel loop over each top-level block. fp32 ``exp`` / ``erf`` / ``sigmoid`` become vector
polynomials (:mod:`~omnic.compile.rules.cpu.fastmath`). No vectors or tiles for reductions: their
own rules do that; this one only makes sure no kernel stays a single-threaded loop nest.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from omnic.compile.rules.cpu.base import CPURule, num_cores
from omnic.compile.rules.cpu.fastmath import use_fast_math
from omnic.compile.rules.cpu.injective import (PARALLEL_MIN_WORK, SBlockRV, get_block_realize, inline_all,
                                               is_spatial_block, parallelize, schedule_spatial_block,
                                               static_extent)

_PLAIN_ITERS = (tirx.IterVar.DataPar, tirx.IterVar.CommReduce)


def _subtree(sch: s_tir.Schedule, block: SBlockRV) -> list:
    """The block and every block nested in it."""
    blocks = []
    tvm_ffi.structural_walk(sch.get(block), [(s_tir.SBlock, blocks.append)], order="pre")
    return blocks


def parallel_leading_spatial(sch: s_tir.Schedule, block: SBlockRV, cores: int) -> None:
    """Fuse the loops that lead the block and feed only its spatial iterators into one parallel
    loop, when the block's work (every loop above it, reductions included; unknown for a block
    with blocks nested in it) is worth sharing.

    Blocks without iterators (opaque: a scan may carry state from one iteration to the next) or
    with other than spatial and reduction iterators, in the block or nested in it, stay serial.
    """
    subtree = _subtree(sch, block)
    if not all(b.iter_vars and all(iv.iter_type in _PLAIN_ITERS for iv in b.iter_vars) for b in subtree):
        return
    loops = list(sch.get_loops(block))
    stmt, realize = sch.get(block), get_block_realize(sch, block)
    reduction_vars: set = set()
    for iv, value in zip(stmt.iter_vars, realize.iter_values):
        if iv.iter_type != tirx.IterVar.DataPar:
            reduction_vars |= set(tirx.analysis.undefined_vars(value))
    leading = []
    for lp in loops:
        if sch.get(lp).loop_var in reduction_vars:
            break
        leading.append(lp)
    work = 1 if len(subtree) == 1 else None
    for lp in loops:
        ext = static_extent(sch, lp)
        work = None if work is None or ext is None else work * ext
    if leading and (work is None or work >= PARALLEL_MIN_WORK):
        parallelize(sch, leading, cores=cores, work=None)


def _schedule_spatial(sch: s_tir.Schedule, block: SBlockRV, target: tvm.target.Target) -> bool:
    """The injective rule's schedule of one spatial block; False where its plan does not fit."""
    try:
        schedule_spatial_block(sch, block, target)
    except Exception:  # noqa: BLE001 - a shape the plan did not foresee: the block only goes parallel
        return False
    return True


def schedule_any_kernel(func: tirx.PrimFunc, target: tvm.target.Target, *, inline: bool = True
                        ) -> s_tir.Schedule | None:
    """Spatial blocks as the injective rule does them, the others parallel over their leading
    spatial loops; None when not even the top-level blocks can be read."""
    sch = s_tir.Schedule(func)
    cores = num_cores(target)
    infos = normalize_prim_func(sch)
    if infos is None:  # nested blocks: only the top-level ones' outer loops
        try:
            root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
        except Exception:  # noqa: BLE001 - no root block: not a kernel the schedule can read
            return None
        for block in sch.get_child_blocks(root):
            try:
                parallel_leading_spatial(sch, block, cores)
            except Exception:  # noqa: BLE001, S112 - a loop TVM will not run in parallel stays serial
                continue
        return sch
    blocks = [info.block_rv for info in (inline_all(sch, infos) if inline else infos)]
    for block in blocks:
        if not (is_spatial_block(sch, block) and _schedule_spatial(sch, block, target)):
            parallel_leading_spatial(sch, block, cores)
    try:
        use_fast_math(sch, blocks)  # exp / erf / sigmoid as vector polynomials, not libm calls
    except Exception:  # noqa: BLE001, S110 - a body the swap cannot rebuild keeps libm's functions
        pass
    return sch


class FallbackRule(CPURule):
    """Any kernel the other rules leave: at least parallel over its outer spatial loops."""

    name = "fallback"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        try:
            return schedule_any_kernel(func, target)
        except Exception:  # noqa: BLE001 - inlining left a form the loops cannot take: do without
            return schedule_any_kernel(func, target, inline=False)
