"""Re-fitting a tuned trace to a kernel of other extents, and applying it there."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace
from tvm.s_tir.schedule import Instruction, Trace

from omnic.compile.tuning.builders import light_tensor_intrinsics



def refit_tile(decision: Sequence[int], extent: int, max_innermost: int | None = None, *,
               lanes: int | None = None) -> tuple[int, ...]:
    """A ``SamplePerfectTile`` decision for a loop of ``extent``, as close to ``decision`` as fits.

    From the innermost factor out, a factor that divides what is left of the extent is kept,
    any other becomes the divisor of what is left nearest to it (in ratio; the larger on a tie);
    the outermost factor takes the rest, so the factors multiply to ``extent``. The innermost
    factor stays within ``max_innermost`` (the sampler's bound) when one is given, and a new
    innermost factor fills whole vectors: at most ``lanes`` or a multiple of it, where such a
    divisor exists (the innermost loop is the one vectorised; a vector plus a remainder, such as
    24 floats on a 16-lane machine, ran several times slower than 12 in measurements).

    Args:
        decision: The tuned factors, outermost first.
        extent: The loop's extent in the kernel the trace is applied to.
        max_innermost: The instruction's ``max_innermost_factor`` (<= 0 or None: no bound).
        lanes: The target's vector lanes for the kernel's dtype (None: no preference).

    Returns:
        The factors, outermost first; ``decision`` itself when it already fits.
    """
    factors = [max(1, int(f)) for f in decision]
    if not factors or extent < 1:
        return tuple(factors)
    if math.prod(factors) == extent and (not max_innermost or max_innermost < 1 or factors[-1] <= max_innermost):
        return tuple(factors)
    rest, out = int(extent), [1] * len(factors)
    for i in range(len(factors) - 1, 0, -1):
        cap = max_innermost if i == len(factors) - 1 and max_innermost and max_innermost > 0 else rest
        f = factors[i]
        innermost = i == len(factors) - 1
        out[i] = f if rest % f == 0 and f <= cap else _nearest_divisor(rest, f, cap, lanes if innermost else None)
        rest //= out[i]
    out[0] = rest
    return tuple(out)


def _nearest_divisor(n: int, target: int, cap: int, lanes: int | None = None) -> int:
    """The divisor of ``n`` up to ``cap`` nearest to ``target`` in ratio (the larger on a tie);
    with ``lanes``, one of at most ``lanes`` or a multiple of it if there is one."""
    divisors = set()
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            divisors |= {d, n // d}
    fitting = [d for d in divisors if d <= max(1, cap)] or [1]
    if lanes and lanes > 1:
        fitting = [d for d in fitting if d <= lanes or d % lanes == 0] or fitting
    return min(fitting, key=lambda d: (abs(math.log(d / target)), -d))


def strip_postproc(trace: Trace) -> Trace:
    """The trace up to its postprocessing part (which follows the tuned tile sizes)."""
    insts = []
    for inst in trace.insts:
        if inst.kind.name == "EnterPostproc":
            break
        insts.append(inst)
    decisions = {inst: trace.get_decision(inst) for inst in insts if trace.get_decision(inst) is not None}
    return Trace(insts, decisions)


def _refit_provider(sch: Schedule, splits: dict[int, int], lanes: int | None) -> Callable[..., Any]:
    """A ``decision_provider`` for ``Trace.apply_to_schedule`` that re-fits every tile decision
    to the extent of the loop it is applied to in ``sch`` (the live loop, after earlier steps),
    and notes in ``splits`` the extent of each loop split by constant factors (by position of
    the instruction in the trace)."""
    position = iter(range(1 << 30))

    def provide(inst: Any, inputs: Any, attrs: Any, decision: Any) -> Any:
        at, kind = next(position), inst.kind.name
        if kind == "Split" and _constant_split(inputs[1:]):
            extent = getattr(sch.get(inputs[0]).extent, "value", None)
            if extent is not None:
                splits[at] = int(extent)
        if kind != "SamplePerfectTile" or decision is None:
            return decision
        extent = getattr(sch.get(inputs[0]).extent, "value", None)
        if extent is None:
            return decision
        return list(refit_tile([int(f) for f in decision], int(extent), int(attrs[1]), lanes=lanes))
    return provide


def _constant_split(factors: Sequence[Any]) -> bool:
    """``[None, f]``: a loop cut into tiles of a constant ``f`` (what omnic's rules write)."""
    return len(factors) == 2 and factors[0] is None and isinstance(factors[1], tvm.tirx.IntImm)


def _refit_splits(trace: Trace, splits: dict[int, int], lanes: int | None) -> Trace | None:
    """``trace`` with each constant split whose tile does not divide its loop's extent (``splits``,
    from :func:`_refit_provider`) cut into the nearest tile that does; None when all divide.
    A tile that does not divide its loop runs predicated, which stops vectorisation."""
    insts, changed = list(trace.insts), False
    for at, extent in splits.items():
        inst = insts[at]
        tile = int(inst.inputs[2].value)
        if extent % tile == 0:
            continue
        new_tile = _nearest_divisor(extent, tile, extent, lanes)
        insts[at] = Instruction(inst.kind, [inst.inputs[0], None, tvm.tirx.IntImm(str(inst.inputs[2].ty), new_tile)],
                                inst.attrs, inst.outputs)
        changed = True
    if not changed:
        return None
    return Trace(insts, {inst: trace.get_decision(inst) for inst in trace.insts
                         if trace.get_decision(inst) is not None})


def apply_refitted(func: tvm.tirx.PrimFunc, trace: Trace, target: tvm.target.Target, *,
                   same_blocks: bool, lanes: int | None = None) -> Schedule:
    """``trace`` (postprocessing removed) on ``func`` with re-fitted decisions, then the target's
    postprocessors. Raises on any failure.

    Args:
        func: The kernel.
        trace: A tuned trace of a kernel of the same family, postprocessing removed.
        target: The target.
        same_blocks: Whether ``func`` has the very blocks of the kernel the trace was tuned on
            (then the trace is replayed as is; else onto the anchor op, the epilogue inlined).
        lanes: Vector lanes for re-fitted innermost tiles (see :func:`refit_tile`).
    """
    if same_blocks:
        # the same blocks as the tuned kernel: replay as is, re-fitting against the live loops
        sch, splits = Schedule(func, error_render_level="detail"), {}
        trace.apply_to_schedule(sch, remove_postproc=True, decision_provider=_refit_provider(sch, splits, lanes))
        refitted = _refit_splits(trace, splits, lanes)
        if refitted is not None:  # tiles of constant size that do not divide their loop here
            sch = Schedule(func, error_render_level="detail")
            refitted.apply_to_schedule(sch, remove_postproc=True, decision_provider=_refit_provider(sch, {}, lanes))
    else:
        # another epilogue: MetaSchedule's anchor-trace replay (which takes no decision provider).
        # A first pass learns each tiled loop's extent here: TVM repairs a decision that does not
        # divide its loop by moving the whole extent to the innermost factor, so the product of
        # the recorded decision is the extent. The second pass runs with the re-fitted decisions.
        sch = Schedule(func, error_render_level="detail")
        schedule_using_anchor_trace(sch, trace, target)
        repaired = [sch.trace.get_decision(inst) for inst in sch.trace.insts if inst.kind.name == "SamplePerfectTile"]
        tiles = [inst for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
        if len(repaired) == len(tiles):
            decisions = {inst: trace.get_decision(inst) for inst in trace.insts}
            for inst, seen in zip(tiles, repaired):
                decisions[inst] = list(refit_tile([int(f) for f in trace.get_decision(inst)],
                                                  math.prod(int(f) for f in seen), int(inst.attrs[1]), lanes=lanes))
            if any(list(map(int, trace.get_decision(inst))) != decisions[inst] for inst in tiles):
                sch = Schedule(func, error_render_level="detail")
                schedule_using_anchor_trace(sch, Trace(list(trace.insts), {k: v for k, v in decisions.items()
                                                                           if v is not None}), target)
    for postproc in _postprocs(target, func):
        if not postproc.apply(sch):
            raise ValueError(f"postprocessor {type(postproc).__name__} rejected the schedule")
    return sch


_POSTPROCS: dict[str, tuple[Any, ...]] = {}


def _postprocs(target: tvm.target.Target, func: tvm.tirx.PrimFunc) -> tuple[Any, ...]:
    """The postprocessors MetaSchedule's tuner runs on a candidate for ``target`` (made once per
    target; a tuning context needs a module, any kernel will do)."""
    text = str(target)
    if text not in _POSTPROCS:
        light_tensor_intrinsics(target)  # the tuner's space generator names tensor intrinsics
        ctx = ms.TuneContext(mod=tvm.IRModule({"main": func}), target=target, space_generator="post-order-apply",
                             task_name="omnic-transfer")
        _POSTPROCS[text] = tuple(ctx.space_generator.postprocs)
    return _POSTPROCS[text]


