"""How candidates are built and measured, at a low cost per trial.

MetaSchedule's defaults start a process pool per batch and import every backend's tensor
intrinsics in each worker; here candidates build with :func:`fast_build` (omnic's CPU pipeline,
no intrinsics import) in this process for small runs or in a persistent pool, and only the
target family's intrinsics are registered (:func:`light_tensor_intrinsics`).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Any, Sequence

import tvm
from tvm.driver import build as tvm_build
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import local_builder
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from omnic.compile.stack_align import pipeline_for
from omnic.compile.tuning.config import TuningConfig
from omnic.core.deployment import Deployment
from omnic.core.errors import describe
from omnic.remote import runner as remote_runner

#: builds a persistent pool serves before its workers are replaced (long-lived TVM workers leak)
POOL_RECYCLE_BATCHES = 25
#: seconds a pool worker may spend on one build
POOL_BUILD_TIMEOUT_S = 60.0


def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any = None) -> Any:
    """MetaSchedule's default build minus ``import tvm.s_tir.tensor_intrin`` (seconds per
    worker), with omnic's CPU pipeline (:mod:`omnic.compile.stack_align`).

    Fine for fp32/fp16 kernels; schedule rules with tensor intrinsics would need the default.
    """
    # the final build's TIR pipeline (aligned vector spills), so what is tuned is what runs
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target,
                     pipeline=pipeline_for(target))


def light_tensor_intrinsics(target: tvm.target.Target) -> None:
    """Register only the tensor intrinsics of ``target``'s family before MetaSchedule needs them.

    ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, which parses every intrinsic of every
    backend with TVMScript; each parse walks ``inspect.stack()``, whose cost grows with
    ``sys.modules`` (torch brings thousands), so the whole package takes minutes where one
    family takes under a second. An empty package object with the real ``__path__`` makes the
    package import a no-op while ``import tvm.s_tir.tensor_intrin.<family>`` keeps working, so
    code that needs another family can still import it explicitly.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return
        pkg = types.ModuleType(name, "Tensor intrinsics (loaded per target family by omnic.compile.tuning).")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__file__, pkg.__package__ = spec, spec.origin, name
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg
    kind = str(target.kind.name)
    attrs = target.attrs
    triple = str(attrs["mtriple"]) if "mtriple" in attrs else ""
    if kind == "llvm":
        families = ["arm_cpu"] if triple.startswith(("aarch64", "arm")) else \
            ["riscv_cpu"] if triple.startswith("riscv") else ["x86"]
    else:
        families = {"cuda": ["cuda"], "rocm": ["rocm"], "metal": ["metal"], "hexagon": ["hexagon"]}.get(kind, [])
    for family in families:
        try:
            importlib.import_module(f"{name}.{family}")
        except Exception:  # noqa: BLE001 - a missing family only disables tensorized rules
            pass


def quiet_metaschedule_console() -> None:
    """Keep MetaSchedule's console quiet (the tqdm bar says what matters); its per-task log
    files under ``<database>/logs`` keep every detail.

    MetaSchedule derives its console level from its logger's level and then sets that logger to
    DEBUG, so this runs before every job. It also rebuilds its logging config from the names of
    the logger's handlers and crashes on an unnamed one (pytest adds such handlers).
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)


def builder_kind(config: TuningConfig, planned_trials: int) -> str:
    """The builder a run of ``planned_trials`` uses (resolves ``config.builder == "auto"``)."""
    if config.builder != "auto":
        return config.builder
    return "pool" if planned_trials >= config.pool_min_trials else "inproc"


@derived_object
class InProcBuilder(ms.builder.PyBuilder):
    """Serial builds in the tuning process: no pool, so no ``import tvm`` per worker."""

    def build(self, build_inputs: Sequence[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        out = []
        for bi in build_inputs:
            try:
                out.append(ms.builder.BuilderResult(local_builder.default_export(fast_build(bi.mod, bi.target)),
                                                    None))
            except Exception as exc:  # noqa: BLE001 - a failed candidate is data, not a crash
                # uncut: the task's log file is the only record of why a candidate failed
                out.append(ms.builder.BuilderResult(None, describe(exc, limit=sys.maxsize)))
        return out


@derived_object
class PoolBuilder(ms.builder.PyBuilder):
    """A persistent process pool (LocalBuilder starts one per batch), recycled every
    :data:`POOL_RECYCLE_BATCHES` batches because long-lived TVM workers leak slowly."""

    def __init__(self, workers: int):
        super().__init__()
        self.workers = workers
        self.pool, self.batches = None, 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def build(self, build_inputs: Sequence[ms.builder.BuilderInput]) -> list[ms.builder.BuilderResult]:
        if self.pool is None or self.batches >= POOL_RECYCLE_BATCHES:
            if self.pool is not None:
                self.pool.shutdown()
            self.pool, self.batches = PopenPoolExecutor(max_workers=self.workers, timeout=POOL_BUILD_TIMEOUT_S), 0
        self.batches += 1
        out = []
        args = [(fast_build, None, bi.mod, bi.target, None) for bi in build_inputs]
        for r in self.pool.map_with_error_catching(lambda a: local_builder._worker_func(*a), args):
            if r.status == StatusKind.COMPLETE:
                out.append(ms.builder.BuilderResult(r.value, None))
            else:
                out.append(ms.builder.BuilderResult(None, f"PoolBuilder: {r.status}: {r.value}"))
        return out


def make_builder(config: TuningConfig, kind: str) -> ms.builder.Builder:
    """The builder of :func:`builder_kind` ``kind``; a pool builder must be ``close()``d."""
    if kind == "local":
        return ms.builder.LocalBuilder(max_workers=config.builder_workers, f_build=fast_build)
    if kind == "inproc":
        return InProcBuilder()
    return PoolBuilder(config.builder_workers)


def make_runner(deployment: Deployment, config: TuningConfig, runner: ms.runner.Runner | None) -> ms.runner.Runner:
    """``runner`` if given, else one that measures as ``config`` says: MetaSchedule's local
    runner, or the RPC runner of a remote deployment."""
    if config.cold_cache_repeats > 0:
        evaluator = ms.runner.EvaluatorConfig(number=1, repeat=config.cold_cache_repeats, min_repeat_ms=0,
                                              enable_cpu_cache_flush=True)
    else:
        evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=1,
                                              min_repeat_ms=int(config.min_repeat_ms), enable_cpu_cache_flush=False)
    if runner is not None:
        return runner
    if deployment.is_remote:
        return remote_runner.make_rpc_runner(deployment, evaluator)  # looked up per call: tests patch it
    return ms.runner.LocalRunner(evaluator_config=evaluator)
