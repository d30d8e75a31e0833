"""Applying a tuning database kernel by kernel, so that a record never fails a build.

Tasks are keyed by their anchor op (:data:`~omnic.compile.tuning.database.MODULE_EQUALITY`), not
by the elementwise epilogue fused after it, so the best record of a task is replayed onto every
kernel that shares the anchor: conv+relu, a bare conv whose output feeds two kernels, conv+add+
hardswish. A trace does not always replay onto another epilogue: MetaSchedule's multi-level
tiling asks for the conv's consumers (``GetConsumers``), and a kernel where the conv has another
number of consumers stops with ``Check failed: old_outputs.size() == new_outputs.size()`` in
``TranslateAddOutputRVs``; a cache stage may not exist (``ScheduleError ... 'cache-read'``).
TVM's ``MetaScheduleApplyDatabase`` lets that error end the build, and every later build with the
same database ends the same way.

:func:`apply_database` does what that pass does for one kernel at a time, inside a try: the
records of the kernel's workload are tried best first; the first that replays is used (when the
best one replays, the kernel is exactly what TVM's pass gives, so tuned builds keep their speed);
when none does, the kernel is left as the build would have it without a database (unscheduled on
CPUs, a default dlight schedule on GPUs). Each (kernel, record) pair that fails is written to
:data:`REPLAY_FAILURES` next to the database, so that later builds skip it without replaying it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from omnic.compile.rules.cpu.base import PROVENANCE_ATTR
from omnic.compile.tuning.database import run_ms
from omnic.compile.tuning.defaults import anchor_key
from omnic.core.errors import describe

#: Side file of (kernel, record) pairs known not to replay, next to the database. Not the tuning
#: ledger: that one is written by tuners under the database lock, this one by builds, which
#: never take it.
REPLAY_FAILURES = "omnic_replay_failures.json"
REPLAY_FAILURES_VERSION = 1
#: Records tried per kernel, best first. Records of one task tend to fail on the same kernel for
#: the same reason (they share the rule's sketch), so trying the whole database buys little.
MAX_RECORDS_TRIED = 8
#: Length of a quoted replay error in the report.
ERROR_LIMIT = 300


@dataclass(frozen=True, kw_only=True)
class KernelReplay:
    """What applying the database did to one kernel whose workload it has records for.

    Attributes:
        kernel: The kernel's name in the module.
        outcome: ``"tuned"`` (a record replayed), ``"default"`` (the kernel's default schedule
            is not slower than its best record, timed side by side at build time or, where the
            build cannot time kernels, when its task was tuned: it keeps the default) or
            ``"fallback"`` (no record replayed; the kernel keeps the schedule an untuned build
            gives it).
        record: Rank of the record used (0: the best), None on fallback.
        records_failed: Records that did not replay on this kernel, tried in this build or known
            from an earlier one.
        records_skipped: Of those, the ones skipped because an earlier build saw them fail.
        error: The first replay error of this build, quoted (None when nothing was retried).
    """

    kernel: str
    outcome: str
    record: int | None = None
    records_failed: int = 0
    records_skipped: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_database(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database, *,
                   failures_dir: Path | None = None, defaults: Mapping[str, float] | None = None,
                   records_only: frozenset[str] = frozenset(), accept: Callable[..., bool] | None = None
                   ) -> tuple[tvm.IRModule, tuple[KernelReplay, ...]]:
    """Schedule every kernel of ``mod`` that ``database`` has a record for that replays on it.

    Args:
        mod: A Relax module whose PrimFuncs are the kernels (the prepared module).
        target: The target the records were tuned for.
        database: The MetaSchedule database to apply.
        failures_dir: Folder of :data:`REPLAY_FAILURES` (the database's folder), or None to
            neither read nor write it.
        defaults: Anchor key -> milliseconds of the default schedule, timed when the task was
            tuned (:func:`omnic.compile.tuning.defaults.baselines`): a kernel whose best record
            is not faster keeps its default schedule (outcome ``"default"``).
        records_only: Kernels that use their records whatever ``defaults`` or ``accept`` says
            (their default schedule does not build).
        accept: ``accept(gv, original, scheduled)``: whether the replayed kernel is kept (the
            build times it against the kernel's default schedule on a local CPU,
            :mod:`omnic.compile.transfer.choice`); False keeps the default schedule (outcome
            ``"default"``). When given, ``defaults`` is not consulted: a timing side by side
            decides better than two measurements taken at different times.

    Returns:
        ``(module, outcomes)``: the module with the replayed kernels marked scheduled, and one
        :class:`KernelReplay` per kernel the database has records for, in module order.
    """
    known = _read_failures(failures_dir)
    new_failures: set[str] = set()
    replaced: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] = {}
    outcomes: list[KernelReplay] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        tir_mod = _normalize_mod(func)
        if not database.has_workload(tir_mod):
            continue
        # has_workload first: commit_workload of a new workload would append to the database
        records = database.get_top_k(database.commit_workload(tir_mod), MAX_RECORDS_TRIED)
        if not records:
            continue
        baseline = None if accept is not None or not defaults or gv.name_hint in records_only \
            else defaults.get(anchor_key(tir_mod))
        best_ms = run_ms(records[0].run_secs)
        if baseline is not None and (best_ms is None or best_ms >= baseline):
            # tuning has not beaten the default schedule yet: the kernel keeps it
            outcomes.append(KernelReplay(kernel=gv.name_hint, outcome="default"))
            continue
        kernel_key = f"{tvm_ffi.structural_hash(tir_mod) & 0xFFFFFFFFFFFFFFFF:016x}"
        failed = skipped = 0
        error = None
        for rank, record in enumerate(records):
            key = f"{kernel_key}:{_trace_key(record)}"
            if key in known:
                failed, skipped = failed + 1, skipped + 1
                continue
            try:
                tuned = _replay(tir_mod, record, target)
            except Exception as exc:  # noqa: BLE001 - any replay error means: try the next record
                failed += 1
                new_failures.add(key)
                error = error or describe(exc, ERROR_LIMIT)
                continue
            # the kernel keeps its own attributes (names, layout-free buffers); it is now scheduled
            provenance = f"tuned:{_trace_key(record)}"
            scheduled = tvm.tirx.PrimFunc(tuned.params, tuned.body, tuned.ret_type, attrs=func.attrs
                                          ).with_attr("tirx.is_scheduled", True).with_attr(PROVENANCE_ATTR, provenance)
            if accept is not None and gv.name_hint not in records_only and not accept(gv, func, scheduled):
                # timed against the kernel's default schedule on this CPU, the record lost
                outcomes.append(KernelReplay(kernel=gv.name_hint, outcome="default", record=rank))
                break
            replaced[gv] = scheduled
            outcomes.append(KernelReplay(kernel=gv.name_hint, outcome="tuned", record=rank, records_failed=failed,
                                         records_skipped=skipped, error=error))
            break
        else:
            outcomes.append(KernelReplay(kernel=gv.name_hint, outcome="fallback", records_failed=failed,
                                         records_skipped=skipped, error=error))
    if new_failures:
        _write_failures(failures_dir, known | new_failures)
    if replaced:
        mod = mod.clone()
        for gv, func in replaced.items():
            mod.update_func(gv, func)
    return mod, tuple(outcomes)


def _replay(tir_mod: tvm.IRModule, record: ms.database.TuningRecord, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """The record's schedule on ``tir_mod``, as TVM's ``MetaScheduleApplyDatabase`` builds it."""
    # "ignore-ndarray" equality, as TVM's pass decides between the two paths
    if tvm_ffi.structural_equal(tir_mod, record.workload.mod, skip_tensor_content=True):
        # the very kernel that was tuned: its trace replays as recorded
        sch = Schedule(record.workload.mod, error_render_level="detail")
        record.trace.apply_to_schedule(sch, remove_postproc=False)
    else:
        # another kernel with the same anchor op: the anchor's part of the trace, the rest inlined
        sch = Schedule(tir_mod, error_render_level="detail")
        schedule_using_anchor_trace(sch, record.trace, target)
    funcs = list(sch.mod.functions.values())
    if len(funcs) != 1 or not isinstance(funcs[0], tvm.tirx.PrimFunc):
        raise ValueError(f"the replayed schedule has {len(funcs)} functions, expected one PrimFunc")
    return funcs[0]


def _trace_key(record: ms.database.TuningRecord) -> str:
    """A short, stable name of the record's trace (the record itself has no id)."""
    # the trace as Python statements, decisions included (its JSON form holds TVM objects, such
    # as index maps, that json cannot write)
    text = "\n".join(str(line) for line in record.trace.as_python(remove_postproc=False))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_failures(folder: Path | None) -> set[str]:
    """Known failures; an empty set when the file is missing, unreadable, of another version or
    written by another TVM (which may replay what this one could not)."""
    if folder is None:
        return set()
    try:
        data = json.loads((Path(folder) / REPLAY_FAILURES).read_text())
        if data.get("version") == REPLAY_FAILURES_VERSION and data.get("tvm") == tvm.__version__:
            return {str(k) for k in data.get("failures", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # a broken file only costs the replays it would have saved
    return set()


def _write_failures(folder: Path | None, failures: set[str]) -> None:
    """Write the known failures atomically; a cache that cannot be written only loses the hint."""
    if folder is None:
        return
    path = Path(folder) / REPLAY_FAILURES
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"version": REPLAY_FAILURES_VERSION, "tvm": tvm.__version__,
                                   "failures": sorted(failures)}, indent=1))
        os.replace(tmp, path)  # write-then-rename: a kill leaves the old file or the new one
    except OSError:
        tmp.unlink(missing_ok=True)
