"""The last default rule: a kernel no other rule took still runs on every core.

It inlines the spatial blocks that sit between reductions (padding, the elementwise steps of a
softmax or a norm), gives each block left that is all spatial the injective rule's schedule, and
fuses the spatial loops that lead each other block (a reduction) into one parallel loop, in front
of its reduction loops. No vectors and no tiles for reductions: their own rules do that; this one
only makes sure no kernel stays a single-threaded loop nest.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

from omnic.compile.rules.cpu.base import CPURule, num_cores
from omnic.compile.rules.cpu.injective import PARALLEL_MIN_WORK, parallelize, schedule_spatial_block


def _parallel_leading_spatial(sch: s_tir.Schedule, info, cores: int) -> None:
    """Fuse the block's leading spatial loops into one parallel loop, when its work (every loop,
    reductions included) is worth sharing."""
    loops = list(sch.get_loops(info.block_rv))
    kinds = info.dom_kind()
    if len(kinds) != len(loops):
        return
    leading = []
    for lp, kind in zip(loops, kinds):
        if kind != "S":
            break
        leading.append(lp)
    work = 1
    for it in info.iters:
        work = work * it.dom if isinstance(it.dom, int) and work is not None else None
    if work is None or work >= PARALLEL_MIN_WORK:
        parallelize(sch, leading, cores=cores, work=None)


def schedule_any_kernel(func: tirx.PrimFunc, target: tvm.target.Target, *, inline: bool = True
                        ) -> s_tir.Schedule | None:
    """Spatial blocks as the injective rule does them, the others parallel over their leading
    spatial loops; None when the kernel cannot be read as blocks and loops (an opaque kernel)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    if inline:
        infos = try_inline_contiguous_spatial(sch, infos)
    cores = num_cores(target)
    for info in infos:
        if not (info.is_injective() and _schedule_spatial(sch, info.block_rv, target)):
            _parallel_leading_spatial(sch, info, cores)
    return sch


def _schedule_spatial(sch: s_tir.Schedule, block, target: tvm.target.Target) -> bool:
    """The injective rule's schedule of one spatial block; False where its vector plan does not
    fit (the block then only gets a parallel loop)."""
    try:
        schedule_spatial_block(sch, block, target)
    except Exception:  # noqa: BLE001 - a shape the plan did not foresee
        return False
    return True


class FallbackRule(CPURule):
    """Any kernel the other rules leave: at least parallel over its outer spatial loops."""

    name = "fallback"

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        try:
            return schedule_any_kernel(func, target)
        except Exception:  # noqa: BLE001 - inlining left a form the loops cannot take: do without
            return schedule_any_kernel(func, target, inline=False)
