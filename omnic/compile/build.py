"""Build a prepared module: apply tuned schedules, give GPU kernels default ones, compile.

Also reads a build back: which kernels carry a schedule, and the device source of a GPU build.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from omnic.compile.rules.cpu import DEFAULT_RULES, PROVENANCE_ATTR, DefaultOutcome, apply_default_schedules
from omnic.compile.stack_align import pipeline_for
from omnic.compile.transfer import CHOICE, KernelTransfer, policy, transfer_schedules
from omnic.compile.tuning.defaults import baselines
from omnic.compile.tuning.replay import KernelReplay, apply_database
from omnic.core.errors import CompileError, describe
from omnic.core.targets import DeviceSpec


def _apply_database(mod: tvm.IRModule, target: tvm.target.Target, database: Any, failures_dir: Path | None,
                    defaults: Mapping[str, float], skip: Mapping[str, frozenset[str]] | None,
                    accept: Any) -> tuple[tvm.IRModule, tuple[KernelReplay, ...]]:
    # kernel by kernel rather than TVM's MetaScheduleApplyDatabase, which ends the build at the
    # first record that does not replay (a record of another epilogue of the same conv)
    with target:
        mod, replay = apply_database(mod, target, database, failures_dir=failures_dir, defaults=defaults,
                                     records_only=frozenset(skip or ()), accept=accept)
    return mod, replay


def _uncompilable(mod: tvm.IRModule, target: tvm.target.Target, chosen: dict[str, str]) -> dict[str, str]:
    """Kernel -> rule for the default-scheduled kernels of ``mod`` that do not lower and build on
    their own (called only after a build failed, to find the culprits)."""
    kernels = {gv.name_hint: func for gv, func in mod.functions_items()
               if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint in chosen}
    broken = {}
    for name, func in kernels.items():
        try:
            tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target,
                           pipeline=pipeline_for(target))
        except Exception:  # noqa: BLE001 - this rule's schedule of this kernel does not build
            broken[name] = chosen[name]
    return broken


def _fold_weight_layouts(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    # tuned and default CPU kernels re-lay out their weights in a block marked as layout-rewrite
    # preprocessing; split that out and fold it at compile time, so it never runs per call
    mod = relax.transform.SplitLayoutRewritePreproc()(mod)
    with target:
        mod = relax.transform.FoldConstant()(mod)
    return relax.transform.DeadCodeElimination()(mod)


def _default_gpu_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    """What :func:`build_result` built.

    Attributes:
        executable: The Relax VM executable.
        module: The module it was built from (kernels scheduled).
        replay: One entry per kernel the database has records for: tuned with which record, or
            fallen back because none replayed (:class:`~omnic.compile.tuning.replay.KernelReplay`).
        defaults: One entry per kernel left without a schedule by the database (CPU): the
            default rule that scheduled it, or None (:class:`~omnic.compile.rules.cpu.DefaultOutcome`).
        transfers: One entry per kernel without a record of its own (CPU, with a database): the
            tuned workload whose re-fitted trace it got, or why none
            (:class:`~omnic.compile.transfer.KernelTransfer`).
    """

    executable: Any
    module: tvm.IRModule
    replay: tuple[KernelReplay, ...] = ()
    defaults: tuple[DefaultOutcome, ...] = ()
    transfers: tuple[KernelTransfer, ...] = ()

    @property
    def records_failed_to_replay(self) -> int:
        """Records that did not replay on a kernel of this build (tried now or known before)."""
        return sum(k.records_failed for k in self.replay)


def build(mod_prepared: tvm.IRModule, spec: DeviceSpec, target: tvm.target.Target,
          database: Any = None) -> tuple[Any, tvm.IRModule]:
    """Apply a tuning database (if any), schedule what is left, and build.

    Args:
        mod_prepared: The module :func:`omnic.compile.pipeline.prepare` returns.
        spec: The device.
        target: Its TVM target.
        database: A MetaSchedule database, or None for an untuned build.

    Returns:
        ``(executable, final_module)``.

    Raises:
        CompileError: TVM failed to build.
    """
    result = build_result(mod_prepared, spec, target, database)
    return result.executable, result.module


def build_result(mod_prepared: tvm.IRModule, spec: DeviceSpec, target: tvm.target.Target, database: Any = None, *,
                 failures_dir: Path | None = None, default_rules: Sequence[Any] = DEFAULT_RULES,
                 transfer: str | None = CHOICE, skip: Mapping[str, frozenset[str]] | None = None,
                 judge_records: bool = True) -> BuildResult:
    """:func:`build`, also saying what applying the database did to each kernel.

    A record that does not replay on a kernel never fails the build: the next best record is
    tried, and when none replays the kernel keeps the schedule an untuned build gives it.

    Args:
        mod_prepared: The module :func:`omnic.compile.pipeline.prepare` returns.
        spec: The device.
        target: Its TVM target.
        database: A MetaSchedule database, or None for an untuned build.
        failures_dir: The database's folder, where (kernel, record) pairs that did not replay
            are remembered so later builds skip them; None to remember nothing.
        default_rules: CPU: the default schedule rules for kernels the database does not
            schedule (:data:`omnic.compile.rules.cpu.DEFAULT_RULES`; empty for plain loop nests).
        transfer: CPU, with a database: how kernels without a record of their own get the tuned
            trace of a similar workload (one of :data:`omnic.compile.transfer.CHOICES`, weighing
            it against the default rules), or None for no transfer-tuning.
        skip: Kernel name -> default rules not to use on it (set when a rule's schedule of that
            kernel did not build; the build is then retried without it).
        judge_records: CPU: a record is replayed only where it beats the kernel's default
            schedule: timed side by side when ``transfer`` is ``"measure"`` and the CPU is this
            one, else by the default times the tuner wrote into the ledger. False replays the
            best record of every kernel as it is.

    Returns:
        A :class:`BuildResult`.

    Raises:
        CompileError: TVM failed to build.
    """
    replay: tuple[KernelReplay, ...] = ()
    defaults: tuple[DefaultOutcome, ...] = ()
    transfers: tuple[KernelTransfer, ...] = ()
    scheduled_by_rules = mod_prepared
    try:
        mod = mod_prepared
        if database is not None:
            # the default schedules' times, measured when the tasks were tuned: a record or a
            # transfer is used only where tuning beat them
            judged = judge_records and spec.kind != "gpu"
            timed = baselines(failures_dir) if judged and default_rules else {}
            choice = policy(transfer, target=target, local=spec.local, default_rules=default_rules,
                            memo_dir=failures_dir) if spec.kind != "gpu" and transfer is not None else None
            # the measure choice's side-by-side timing judges exact records too (a record that
            # won in the tuner's runner can lose to the default schedule inside the build)
            accept = choice["accept"] if judged and choice is not None else None
            mod, replay = _apply_database(mod, target, database, failures_dir, timed, skip, accept)
            if choice is not None:
                # kernels of workloads the database lacks get the trace of their nearest tuned
                # relative (another width or resolution of the same op), before the default rules
                with target:
                    mod, transfers = transfer_schedules(mod, target, database, defaults=timed, **choice)
        if spec.kind == "gpu":
            mod = _default_gpu_schedules(mod, target)
        else:
            mod, defaults = apply_default_schedules(mod, target, default_rules, skip=skip)
            scheduled_by_rules = mod
            mod = _fold_weight_layouts(mod, target)
        # Folding the layout-rewritten weights leaves each kernel's constants in a tuple that the
        # VM would build and unpack on every call (3 builtin calls per kernel): pass the constants
        # to the kernels directly.
        mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
        executable = tvm.compile(mod, target, tir_pipeline=pipeline_for(target))
    except Exception as exc:
        chosen = {o.kernel: o.rule for o in defaults if o.rule}
        broken = _uncompilable(scheduled_by_rules, target, chosen) if chosen else {}
        if broken:
            # a default schedule that does not build (a TVM lowering limit its rule did not
            # foresee) gives way to the next rule on that kernel: it never fails the build
            more = dict(skip or {})
            for kernel, rule in broken.items():
                more[kernel] = more.get(kernel, frozenset()) | {rule}
            return build_result(mod_prepared, spec, target, database, failures_dir=failures_dir,
                                default_rules=default_rules, transfer=transfer, skip=more,
                                judge_records=judge_records)
        if any(t.outcome == "transferred" for t in transfers):
            # a transferred schedule that does not compile (as some candidates of a tuning run do
            # not) costs the transfers, never the build
            return build_result(mod_prepared, spec, target, database, failures_dir=failures_dir,
                                default_rules=default_rules, transfer=None, skip=skip,
                                judge_records=judge_records)
        raise CompileError(f"building for {spec.name} failed: {describe(exc)}") from exc
    return BuildResult(executable=executable, module=mod, replay=replay, defaults=defaults, transfers=transfers)


#: the kinds of schedule a kernel can have, in the order reports list them
SCHEDULE_KINDS = ("tuned", "transferred", "default", "unscheduled")


def kernel_schedules(mod: tvm.IRModule) -> tuple[tuple[str, str], ...]:
    """``(kernel, provenance)`` for every PrimFunc of a built module, sorted by kernel name.

    Provenance is ``"tuned:<record>"`` (an exact database record), ``"transferred:<workload>:<record>"``
    (a tuned schedule of a similar workload, re-fitted), ``"default:<rule>"`` (a default rule; GPU
    kernels scheduled by dlight read ``"default:dlight"``) or ``"unscheduled"`` (a plain loop nest).
    """
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        attrs = func.attrs
        provenance = str(attrs[PROVENANCE_ATTR]) if attrs is not None and PROVENANCE_ATTR in attrs else None
        if provenance is None:
            scheduled = bool(attrs is not None and attrs.get("tirx.is_scheduled", False))
            provenance = "default:dlight" if scheduled else "unscheduled"
        out.append((gv.name_hint, provenance))
    return tuple(sorted(out))


def schedule_counts(schedules: Sequence[tuple[str, str]]) -> dict[str, int]:
    """How many kernels have each kind of schedule (:data:`SCHEDULE_KINDS`)."""
    counts = dict.fromkeys(SCHEDULE_KINDS, 0)
    for _, provenance in schedules:
        counts[provenance.split(":", 1)[0]] += 1
    return counts


def build_fingerprint(schedules: Sequence[tuple[str, str]]) -> str:
    """A short hash of which schedule every kernel got: two builds of one model with equal
    fingerprints run the same kernels."""
    text = "\n".join(f"{kernel}={provenance}" for kernel, provenance in schedules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scheduled_kernels(mod: tvm.IRModule) -> tuple[list[str], list[str]]:
    """Names of the PrimFuncs that carry a schedule (tuned or dlight) and of those that do not."""
    names_sched, names_plain = [], []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            is_sched = bool(attrs is not None and attrs.get("tirx.is_scheduled", False))
            (names_sched if is_sched else names_plain).append(gv.name_hint)
    return names_sched, names_plain


def device_source(executable: Any) -> tuple[str, str] | None:
    """``(kind, source)`` of the device kernels of a GPU build (CUDA or OpenCL), else None."""
    def walk(module):
        yield module
        for sub in module.imports:
            yield from walk(sub)

    for module in walk(executable.mod):
        kind = module.kind
        if kind in ("cuda", "opencl"):
            return kind, module.inspect_source("cuda" if kind == "cuda" else "cl")
    return None
