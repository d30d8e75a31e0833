"""Schedule rule for CPU pooling blocks (max, average, adaptive).

TOPI marks its pooling blocks with a ``schedule_rule`` annotation (:data:`POOL_RULES`) and
MetaSchedule's ``ApplyCustomRule`` looks for a global function
``s_tir.meta_schedule.<target key>.<rule>`` to schedule them. TVM registers none for CPUs, so a
pool got the generic rules, which rfactor the window into a buffer as large as the output times
the window height and vectorize nothing.

This rule schedules the window reduction directly: padding inlined into the reduction, the
output's innermost dimension split into vector lanes, the window loops inside that (unrolled
when small), every other output loop fused and run in parallel, and an average's division
computed at the same place. The design space holds a few variants (lanes, unrolling, parallel
or not) plus the input schedule; the tuner measures them and keeps the fastest.
"""
from __future__ import annotations

from typing import Callable

from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV

from omnic.compile.rules.marking import POOL_RULES
from omnic.compile.rules.utils import (REDUCTION, SPATIAL, applied_variants, extent, is_reduction, iter_kinds,
                                       lanes_for)

#: unroll the window loops when the window has at most this many elements
MAX_UNROLLED_WINDOW = 64
#: the design space: widest vector, unrolled window, parallel outer loop
VARIANTS = tuple({"lanes_cap": lanes_cap, "unroll": unroll, "parallel": parallel}
                 for lanes_cap, unroll, parallel in ((16, True, True), (8, True, True), (16, False, True),
                                                     (16, True, False)))


def schedule_pool(sch: s_tir.Schedule, block: SBlockRV) -> list[s_tir.Schedule]:
    """Design space of one pooling block: a list of schedules (the input one last)."""
    variants = applied_variants(sch, block, _apply, VARIANTS)
    # the input too: with it the tuner can still pick the generic rules' parallel/vectorize
    # annotations where a variant here is slower (e.g. a strided NCHW window)
    return variants + [sch]


def _apply(sch: s_tir.Schedule, block: SBlockRV, *, lanes_cap: int, unroll: bool, parallel: bool) -> bool:
    annotated = block
    if is_reduction(sch, annotated):
        reduction, finisher = annotated, None
    else:  # an average: the annotation sits on the division, the window sum is its producer
        producers = [p for p in sch.get_producers(annotated) if is_reduction(sch, p)]
        if len(producers) != 1:
            return False
        reduction, finisher = producers[0], annotated
    for producer in sch.get_producers(reduction):  # the padding: read in place, not copied
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001 - not inlinable (e.g. a real computation): leave it
            pass

    kinds = iter_kinds(sch, reduction)
    loops = sch.get_loops(reduction)
    if len(loops) != len(kinds):
        return False
    spatial = [lp for lp, k in zip(loops, kinds) if k == SPATIAL]
    window = [lp for lp, k in zip(loops, kinds) if k == REDUCTION]
    if not spatial or not window or len(spatial) + len(window) != len(loops):
        return False
    extents = [extent(sch, lp) for lp in spatial]
    if any(e is None for e in extents):
        return False
    # vector lanes over the innermost output dimension wider than 1 (channels in NHWC)
    inner_at = max((i for i, e in enumerate(extents) if e > 1), default=None)
    if inner_at is None:
        return False
    lanes = lanes_for(extents[inner_at], lanes_cap)
    if lanes is None:
        return False
    outer, inner = sch.split(spatial[inner_at], [None, lanes])
    rest = spatial[:inner_at] + [outer] + spatial[inner_at + 1:]
    sch.reorder(*rest, *window, inner)
    fused = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    sch.vectorize(inner)
    window_size = 1
    for lp in window:
        window_size *= extent(sch, lp) or MAX_UNROLLED_WINDOW + 1
    if unroll and window_size <= MAX_UNROLLED_WINDOW:
        for lp in window:
            sch.unroll(lp)
    if finisher is not None:
        sch.reverse_compute_at(finisher, fused)
        sch.vectorize(sch.get_loops(finisher)[-1])
    if parallel and (extent(sch, fused) or 0) > 1:
        sch.parallel(fused)
    return True


#: ``schedule_rule`` value -> rule function, for :func:`omnic.compile.rules.register`
RULES: dict[str, Callable[[s_tir.Schedule, SBlockRV], list[s_tir.Schedule]]] = {
    rule: schedule_pool for rule in POOL_RULES}
