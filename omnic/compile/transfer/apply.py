"""The pass: every unscheduled kernel gets the re-fitted trace of its nearest tuned relative."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import tvm
from tvm.s_tir import meta_schedule as ms

from omnic.compile.rules.cpu.apply import is_scheduled
from omnic.compile.rules.cpu.base import PROVENANCE_ATTR, vector_lanes
from omnic.compile.transfer.family import Source, family_of, index_database, nearest
from omnic.compile.transfer.refit import apply_refitted, strip_postproc
from omnic.compile.tuning.replay import _trace_key
from omnic.core.errors import describe

#: length of a quoted error in an outcome
ERROR_LIMIT = 300


@dataclass(frozen=True, kw_only=True)
class KernelTransfer:
    """What transfer-tuning did to one kernel that had no schedule.

    Attributes:
        kernel: The kernel's name in the module.
        outcome: ``"transferred"``; ``"default"`` (the nearest relative's tuning did not beat
            its default schedule, so neither would its trace here); ``"no-anchor"`` (no
            reduction block to key a family by), ``"no-source"`` (the database has no workload of its family), ``"failed"`` (no tried
            trace replayed) or ``"rejected"`` (one replayed, the choice kept the default).
        source: Short hash of the workload whose trace was used (or last tried).
        record: Rank of the record used among its workload's (0: the best).
        trace: Key of that record's trace (as in ``"tuned:<key>"`` provenance).
        distance: :func:`distance` between the kernel and the source workload.
        tried: Traces tried (replays that failed plus the one used).
        ms: Milliseconds spent on the kernel.
        error: The first replay error, quoted (None when the first try replayed).
    """

    kernel: str
    outcome: str
    source: str | None = None
    record: int | None = None
    trace: str | None = None
    distance: float | None = None
    tried: int = 0
    ms: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transfer_schedules(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database, *,
                       max_distance: float = math.inf, accept: Callable[..., bool] | None = None,
                       index: dict[str, tuple[Source, ...]] | None = None,
                       defaults: Mapping[str, float] | None = None,
                       ) -> tuple[tvm.IRModule, tuple[KernelTransfer, ...]]:
    """Give every unscheduled kernel of ``mod`` the re-fitted trace of its nearest tuned relative.

    Args:
        mod: A module whose PrimFuncs are the kernels; scheduled ones (``tirx.is_scheduled``)
            are left alone.
        target: The target the database was tuned for (a CPU target).
        database: The tuning database.
        max_distance: Sources further than this (:func:`distance`) are not used.
        accept: ``accept(gv, original, scheduled)``, called with a transferred kernel before it
            is kept; False leaves the kernel unscheduled (outcome ``"rejected"``). None keeps
            every kernel that replays.
        index: A prebuilt :func:`index_database` of ``database`` (built here when None).
        defaults: Anchor key -> default-schedule milliseconds of the database's workloads
            (:func:`omnic.compile.tuning.defaults.baselines`): a kernel whose nearest relative
            was not tuned past its default keeps its own default (outcome ``"default"``).

    Returns:
        ``(module, outcomes)``: transferred kernels are marked ``tirx.is_scheduled`` with
        provenance ``"transferred:<source workload>:<trace key>"``; one
        :class:`KernelTransfer` per unscheduled kernel, in module order.
    """
    index = index_database(database, defaults=defaults) if index is None else index
    replaced: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] = {}
    outcomes: list[KernelTransfer] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        t0 = time.perf_counter()
        outcome, new_func = _transfer_one(gv, func, target, index, max_distance, accept)
        outcomes.append(dataclasses.replace(outcome, ms=round(1e3 * (time.perf_counter() - t0), 3)))
        if new_func is not None:
            replaced[gv] = new_func
    if replaced:
        mod = mod.clone()
        for gv, func in replaced.items():
            mod.update_func(gv, func)
    return mod, tuple(outcomes)


def _transfer_one(gv: tvm.ir.GlobalVar, func: tvm.tirx.PrimFunc, target: tvm.target.Target,
                  index: dict[str, tuple[Source, ...]], max_distance: float, accept: Callable[..., bool] | None
                  ) -> tuple[KernelTransfer, tvm.tirx.PrimFunc | None]:
    kernel = gv.name_hint
    family = family_of(func)
    if family is None:
        return KernelTransfer(kernel=kernel, outcome="no-anchor"), None
    sources = nearest(family, index, max_distance=max_distance)
    if not sources:
        return KernelTransfer(kernel=kernel, outcome="no-source"), None
    if sources[0][1].default_faster:
        # its nearest relative's tuning did not beat that relative's default schedule
        return KernelTransfer(kernel=kernel, outcome="default", source=sources[0][1].workload,
                              distance=round(sources[0][0], 4)), None
    sources = [(d, s) for d, s in sources if not s.default_faster]
    tried, error, last = 0, None, None
    lanes = vector_lanes(target, family.dtype)
    for dist, source in sources:
        for rank, record in enumerate(source.records):
            tried += 1
            last = (source.workload, round(dist, 4))
            try:
                sch = apply_refitted(func, strip_postproc(record.trace), target, lanes=lanes,
                                     same_blocks=source.family.blocks == family.blocks)
                scheduled = sch.mod["main"]
            except Exception as exc:  # noqa: BLE001 - any replay error means: try the next trace
                error = error or describe(exc, ERROR_LIMIT)
                continue
            key = _trace_key(record)
            # the kernel keeps its own attributes (symbol, layout-free buffers)
            new_func = tvm.tirx.PrimFunc(scheduled.params, scheduled.body, scheduled.ret_type,
                                         attrs=func.attrs).with_attr("tirx.is_scheduled", True).with_attr(
                PROVENANCE_ATTR, f"transferred:{source.workload}:{key}")
            found = dict(kernel=kernel, source=source.workload, record=rank, trace=key, distance=round(dist, 4),
                         tried=tried, error=error)
            if accept is not None and not accept(gv, func, new_func):
                return KernelTransfer(outcome="rejected", **found), None
            return KernelTransfer(outcome="transferred", **found), new_func
    return KernelTransfer(kernel=kernel, outcome="failed", source=last[0] if last else None,
                          distance=last[1] if last else None, tried=tried, error=error), None


