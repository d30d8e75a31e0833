"""MetaSchedule tuning with a persistent, shared database per device, target and precision.

How a compile uses it (``engine.compile`` -> :func:`database_for`):

1. The tuning tasks are extracted from the *prepared* module (fused, layout-free weights), which
   is exactly what ``build.build`` applies the database to; a workload tuned on anything else
   would never match (TVM_NOTES 9.7.3).
2. One ``JSONDatabase`` per device/target/precision lives under ``<cache>/tuning/<tag>/``. It is
   shared by every model: workloads are keyed by their anchor op (the conv or matmul of a fused
   kernel, shapes included, weights and elementwise epilogue not; :data:`MODULE_EQUALITY`), so a
   second compile of a model tunes nothing, a model sharing layers with an earlier one tunes only
   its new tasks, and the epilogue variants of one conv inside a model are one task.
3. Every task first gets one batch, heaviest first (FLOPs x occurrences), so a short budget buys
   coverage of the heavy tasks first (an untuned kernel is ~40x slower than a tuned one). After
   that each batch goes to the task with the largest claim (:meth:`_Task.claim`, Ansor's
   gradient estimate): the model time it stands for (best latency x occurrences) times the
   improvement a batch is expected to bring, blended from 1 / batches so far and its measured
   improvement over its last two batches. So trials follow each task's share of the model's time
   (a 1 ms conv is worth ten times the trials of a 0.1 ms pool) and leave a task that has stopped
   improving; a fixed split made after one batch each had given 1160 trials to a 0.07 ms
   depthwise conv whose first batch was slow. Tuning stops when the trial budget or the time
   budget (``Deployment.tuning_time_s``) is spent. One MetaSchedule job per batch (instead of
   one job over all tasks) makes records reach the disk after every batch: MetaSchedule's
   gradient scheduler commits nothing until every task has had its first batch (minutes for a
   real network), and it lets the deadline be checked between batches.

Interrupted runs (``kill -9`` included): ``JSONDatabase`` appends each record as it commits, so
every finished batch survives. A small ledger next to the database (``omnic_tasks.json``, written
after every batch) says how many trials each workload got and whether its tuning finished.
On the next run a finished task counts as done; an unfinished one is tuned on, and its earlier
trials count against the budget, so a killed run repeated with the same budget runs only what
it still lacks (its earlier records seed the evolutionary search, so the search resumes rather
than restarts). A workload that has records but no ledger entry (a database copied from elsewhere)
counts as done.

Per-trial cost is kept low as measured in TVM_NOTES 3 and 9.3: a builder without MetaSchedule's
per-batch process pool (in-process for small runs, else a persistent pool), ``fast_build`` (no
tensor intrinsics import), a smaller evolutionary population, a cost model that leaves its
random warm-up after two batches, and no evolution while it is still random.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from omnic.compile import rules as schedule_rules
from omnic.core.cache import cache_root
from omnic.core.deployment import Deployment
from omnic.core.errors import TuningError

LEDGER = "omnic_tasks.json"
LEDGER_VERSION = 2  # 2: tasks are keyed by their anchor op (MODULE_EQUALITY)

#: How MetaSchedule tells workloads apart. "anchor-block" keys a fused kernel by its main op (the
#: conv or matmul) and ignores the elementwise epilogue fused after it: ResNet-18's 3x3 conv of
#: a stage runs as conv+bias, conv+bias+relu and conv+bias+add+relu, three tasks under structural
#: equality that shared nothing. Under anchor-block they are one task (its weight the sum), tuned
#: once; the best schedule of the anchor op is replayed onto each epilogue variant at build time
#: (MetaSchedule's ``schedule_using_anchor_trace``). ResNet-18: 23 tasks become 16.
MODULE_EQUALITY = "anchor-block"



@dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """How MetaSchedule searches (the budget itself comes from the :class:`Deployment`).

    Attributes:
        trials_per_iter: Candidates built and measured per batch.
        population_size: Evolutionary search population. MetaSchedule's default (512, with 4
            genetic iterations) costs about 20 s of search per batch on 2 cores. Measured on an
            Ice Lake host, ResNet-18's 56x56 3x3 conv, 4 minutes each: 128 with 1 iteration ran
            0.56 s per trial and was at 0.96 ms after 55 s; 256 with 2 ran 1.7 s per trial and
            reached 0.95 ms only after 212 s. A network's tasks share a short budget, so the
            cheaper search wins (``benchmarks/README.md``).
        genetic_num_iters: Genetic iterations per batch (default 4 in MetaSchedule).
        warmup_samples: Measured samples before XGBoost predictions are used (before that the
            search samples at random, without evolution). None: two batches, because
            MetaSchedule's fixed 100 spends the first minutes of a short run on random search.
        builder: ``"auto"`` (the default: ``"pool"`` for runs of at least ``pool_min_trials``
            trials, else ``"inproc"``), ``"inproc"`` (serial builds in this process: no worker
            start-up, best for small jobs), ``"pool"`` (a persistent process pool, parallel
            builds: builds are ~40% of a batch, and one serial builder leaves a core idle; 57%
            more trials in the same time on ResNet-18, 2 cores) or ``"local"`` (MetaSchedule's
            LocalBuilder with ``fast_build``; a new pool per batch).
        pool_min_trials: With ``"auto"``, the smallest run that pays for starting the pool's
            workers (each imports TVM and torch, seconds).
        builder_workers: Processes of the ``"pool"``/``"local"`` builders.
        number: Runs per measurement of a candidate.
        min_repeat_ms: Minimum duration of one measurement (swamps timer noise on tiny kernels).
        cold_cache_repeats: N > 0 (default 10) measures N single runs of a candidate, each after
            evicting every argument but the first (the activation) from the CPU caches, as a
            kernel meets its weights and output buffer inside a network. 0 measures hot:
            ``number`` back-to-back runs of at least ``min_repeat_ms``. Hot measurements misled
            the search: on a Zen 3 VM tuned MobileNetV2 kernels ran 2x slower in the graph than
            in the runner (7.0 ms hot sum, 14.0 ms in-graph; the classifier GEMV 6.9x, its 5 MB of
            weights come from DRAM); tuned cold, 15 minutes gave 9.7 ms instead of 12.1 ms
            (omnic/ORT 1.04 vs 1.63, ``benchmarks/README.md``).
        skip_prefixes: Task names that are not worth a trial (pure data movement with no loops to
            schedule). They stay untuned and are reported as skipped.
        seconds_per_trial: A low estimate of the cost of one trial, used to turn a time-only budget
            into a trial cap (the deadline, not the cap, should end a time-budgeted run). 0.3 s
            was reached on a Zen 5 host (MobileNetV2: 1000 trials in 299 s), so the estimate is 0.1 s.
        cost_model: ``"xgb"`` (MetaSchedule's XGBoost model, retrained after every batch) or
            ``"random"`` (no model: saves the seconds of retraining per batch when the budget is
            so small that XGBoost never leaves its warm-up anyway).
        seed: Random seed of the search.
    """

    trials_per_iter: int = 16
    population_size: int = 128
    genetic_num_iters: int = 1
    warmup_samples: int | None = None
    builder: str = "auto"
    builder_workers: int = 2
    pool_min_trials: int = 64
    number: int = 3
    min_repeat_ms: float = 40.0
    cold_cache_repeats: int = 10
    skip_prefixes: tuple[str, ...] = ("reshape",)
    seconds_per_trial: float = 0.1
    cost_model: str = "xgb"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.builder not in ("auto", "inproc", "pool", "local"):
            raise TuningError(f"TuningConfig.builder must be 'auto', 'inproc', 'pool' or 'local', "
                              f"got {self.builder!r}")
        if self.cost_model not in ("xgb", "random"):
            raise TuningError(f"TuningConfig.cost_model must be 'xgb' or 'random', got {self.cost_model!r}")
        if self.trials_per_iter <= 0 or self.population_size <= 0 or self.genetic_num_iters < 0:
            raise TuningError("TuningConfig: trials_per_iter and population_size must be > 0, "
                              "genetic_num_iters >= 0")


@dataclass(kw_only=True)
class _Task:
    """One extracted task and its place in the run."""

    name: str
    key: str  # hash of the workload's anchor op (the database's key, see MODULE_EQUALITY)
    weight: int
    flops: float
    extracted: Any
    status: str = "new"  # new | partial | done | skipped
    trials_before: int = 0  # trials earlier runs gave it (a resumed, partial task)
    planned: bool = False  # part of this run
    trials_run: int = 0
    batches: int = 0
    best_ms: float | None = None
    history: list[float] = field(default_factory=list)  # best_ms after each batch of this run
    complete: bool = False
    space: int = 0  # omnic's own schedule rules' revision for this task (0: MetaSchedule's rules only)

    @property
    def heaviness(self) -> float:
        return self.flops * self.weight

    @property
    def model_ms(self) -> float:
        """The time this task costs the model now (0 while nothing of it has been measured)."""
        return 0.0 if self.best_ms is None else self.best_ms * self.weight

    def claim(self, per_iter: int) -> float:
        """How much model time the next batch is expected to save (the task scheduler's score).

        Ansor's gradient estimate: a blend of the optimistic forward guess (latency falls like
        1/trials, so a task's claim shrinks with the batches it has had) and the backward one
        (the relative improvement per batch over its last two batches), times the model time
        the task stands for. A task whose candidates all failed has no claim.
        """
        batches = self.batches + -(-self.trials_before // per_iter)
        forward = 1.0 / max(1, batches)
        backward = 0.0
        if len(self.history) >= 2:
            window = self.history[-3:]
            backward = max(0.0, (window[0] - window[-1]) / window[-1] / (len(window) - 1))
        return self.model_ms * (_BACKWARD_SHARE * backward + (1.0 - _BACKWARD_SHARE) * forward)


#: Weight of the measured (backward) improvement in a task's claim; Ansor uses 0.2. Higher here,
#: because a run of a few hundred trials must leave a converged conv early.
_BACKWARD_SHARE = 0.5


def _next_task(active: Sequence[_Task], per_iter: int = 16) -> _Task:
    """First batch for every task (in the planned, heaviest-first order), then the largest claim."""
    for task in active:
        if task.batches == 0 and task.trials_before == 0:
            return task
    return max(active, key=lambda t: t.claim(per_iter))


@dataclass
class _Progress:
    """State the measure callback shares with the tuning loop."""

    bar: Any
    ledger: dict[str, Any]
    ledger_path: Path
    deadline: float | None
    task: _Task | None = None
    trials: int = 0
    stopped_by_time: bool = False
    total_ms: dict[str, float] = field(default_factory=dict)
    builder_kind: str = ""


# ----------------------------------------------------------------------------- database location
def database_dir(deployment: Deployment, target: Any) -> Path:
    """``<cache>/tuning/<device>-<kind>-<mcpu>-<threads>-<precision>``.

    The thread count is part of the key because kernels tuned for 2 threads are not the best
    for 4 (MetaSchedule reads ``num-cores`` from the target).
    """
    kind = str(target.kind.name)
    attrs = target.attrs if hasattr(target, "attrs") else {}
    mcpu = str(attrs.get("mcpu", "")) if "mcpu" in attrs else ""
    arch = str(attrs.get("arch", "")) if "arch" in attrs else ""
    cores = str(attrs.get("num-cores", "")) if "num-cores" in attrs else ""
    parts = [deployment.device, kind, mcpu or arch, f"c{cores}" if cores else "", deployment.precision]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p))
    return cache_root() / "tuning" / tag


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise tuning into one database across processes (the second waits, then reuses).

    ``flock`` is released by the kernel when a holder dies, so a killed tuner never blocks.
    """
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _repair_jsonl(path: Path) -> int:
    """Drop a torn last line (a process killed while appending); returns lines dropped."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a torn record
    dropped, rewrite = 0, bool(tail.strip())
    if rewrite:
        try:
            json.loads(tail)
            lines.append(tail)  # whole record, only its newline is missing
        except ValueError:
            dropped = 1
    # a complete-looking last line may still be cut mid-record; drop lines that do not parse
    while lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
            break
        except ValueError:
            lines.pop()
            dropped += 1
    if dropped or rewrite:
        path.write_bytes(b"\n".join(lines) + (b"\n" if lines else b""))
    return dropped


def open_database(path: Path, *, create: bool = True):
    """The ``JSONDatabase`` in ``path`` for tuning into (repaired if a killed writer left a torn
    line). Call it holding :func:`_locked`: it may rewrite the files."""
    from tvm.s_tir import meta_schedule as ms

    workloads, records = path / "database_workload.json", path / "database_tuning_record.json"
    if not create and not workloads.exists():
        return None
    path.mkdir(parents=True, exist_ok=True)
    for p in (workloads, records):
        _repair_jsonl(p)
    try:
        return ms.database.JSONDatabase(path_workload=str(workloads), path_tuning_record=str(records),
                                        allow_missing=True, module_equality=MODULE_EQUALITY)
    except Exception as exc:  # noqa: BLE001 - TVM raises plain errors on unreadable files
        raise TuningError(f"cannot read the tuning database in {path}: {type(exc).__name__}: {exc}\n"
                          f"  fix: move the folder away (tuning starts afresh)") from exc


def open_snapshot(path: Path):
    """A read-only snapshot of the database in ``path`` for applying at build time, or None.

    Takes no lock, so a compile never waits for another process's tuning run; the files are
    copied minus a line being appended at this instant, and loaded from the copy.
    """
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    workloads, records = path / "database_workload.json", path / "database_tuning_record.json"
    if not workloads.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="omnic-db-") as tmp:
        copies = []
        for src in (workloads, records):
            dst = Path(tmp) / src.name
            data = src.read_bytes() if src.exists() else b""
            dst.write_bytes(data)
            _repair_jsonl(dst)
            copies.append(dst)
        try:
            # JSONDatabase reads everything at construction and writes only on commit
            return ms.database.JSONDatabase(path_workload=str(copies[0]), path_tuning_record=str(copies[1]),
                                            allow_missing=False, module_equality=MODULE_EQUALITY)
        except Exception as exc:  # noqa: BLE001
            raise TuningError(f"cannot read the tuning database in {path}: {type(exc).__name__}: {exc}\n"
                              f"  fix: move the folder away (tuning starts afresh)") from exc


def _read_ledger(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == LEDGER_VERSION:
            return data
    except (OSError, ValueError):
        pass
    return {"version": LEDGER_VERSION, "tasks": {}}


def _write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    # write-then-rename: a kill leaves the old or the new ledger, never half of one
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- builders
def fast_build(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule's default build minus ``import tvm.s_tir.tensor_intrin`` (17 s per worker),
    with omnic's CPU pipeline (:mod:`omnic.compile.stack_align`).

    Fine for fp32/fp16 kernels; schedule rules with tensor intrinsics would need the default.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from omnic.compile.stack_align import pipeline_for

    # the final build's TIR pipeline (aligned vector spills), so what is tuned is what runs
    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target,
                     pipeline=pipeline_for(target))


def _light_tensor_intrinsics(target: Any) -> None:
    """Register only the tensor intrinsics of ``target``'s family before MetaSchedule needs them.

    ``TuneContext`` runs ``import tvm.s_tir.tensor_intrin``, which parses every intrinsic of every
    backend with TVMScript; each parse walks ``inspect.stack()``, whose cost grows with
    ``sys.modules`` (torch brings thousands). Measured here: 126 s for the whole package vs 0.6 s
    for the x86 module alone. An empty package object with the real ``__path__`` makes the
    package import a no-op while ``import tvm.s_tir.tensor_intrin.<family>`` keeps working, so
    code that needs another family can still import it explicitly.
    """
    import importlib
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return
        pkg = types.ModuleType(name, "Tensor intrinsics (loaded per target family by omnic.compile.tuning).")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__, pkg.__file__, pkg.__package__ = spec, spec.origin, name
        sys.modules[name] = pkg
        import tvm.s_tir as s_tir

        s_tir.tensor_intrin = pkg
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


def _quiet_metaschedule_console() -> None:
    """Keep MetaSchedule's console quiet (the tqdm bar says what matters); its per-task log
    files under ``<database>/logs`` keep every detail.

    MetaSchedule derives its console level from its logger's level and then sets that logger to
    DEBUG, so this runs before every job. It also rebuilds its logging config from the names of
    the logger's handlers and crashes on an unnamed one (pytest adds such handlers).
    """
    import logging

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)


def _builder_kind(config: TuningConfig, planned_trials: int) -> str:
    if config.builder != "auto":
        return config.builder
    return "pool" if planned_trials >= config.pool_min_trials else "inproc"


def _make_builder(config: TuningConfig, kind: str) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    if kind == "local":
        return ms.builder.LocalBuilder(max_workers=config.builder_workers, f_build=fast_build)

    if kind == "inproc":
        @derived_object
        class InProcBuilder(ms.builder.PyBuilder):
            """Serial builds in the tuning process: no pool, so no 3 s ``import tvm`` per worker."""

            def build(self, build_inputs):
                from tvm.s_tir.meta_schedule.builder.local_builder import default_export

                out = []
                for bi in build_inputs:
                    try:
                        out.append(ms.builder.BuilderResult(default_export(fast_build(bi.mod, bi.target)), None))
                    except Exception as exc:  # noqa: BLE001 - a failed candidate is data, not a crash
                        out.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
                return out

        return InProcBuilder()

    workers = config.builder_workers

    @derived_object
    class PoolBuilder(ms.builder.PyBuilder):
        """A persistent process pool (LocalBuilder starts one per batch), recycled every 25
        batches because long-lived TVM workers leak slowly."""

        def __init__(self):
            super().__init__()
            self.pool, self.batches = None, 0

        def close(self):
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None

        def build(self, build_inputs):
            from tvm.s_tir.meta_schedule.builder import local_builder as lb
            from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

            if self.pool is None or self.batches >= 25:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool, self.batches = PopenPoolExecutor(max_workers=workers, timeout=60.0), 0
            self.batches += 1
            out = []
            args = [(fast_build, None, bi.mod, bi.target, None) for bi in build_inputs]
            for r in self.pool.map_with_error_catching(lambda a: lb._worker_func(*a), args):
                if r.status == StatusKind.COMPLETE:
                    out.append(ms.builder.BuilderResult(r.value, None))
                else:
                    out.append(ms.builder.BuilderResult(None, f"PoolBuilder: {r.status}: {r.value}"))
            return out

    return PoolBuilder()


def _make_runner(deployment: Deployment, config: TuningConfig, runner: Any) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if config.cold_cache_repeats > 0:
        evaluator = ms.runner.EvaluatorConfig(number=1, repeat=config.cold_cache_repeats, min_repeat_ms=0,
                                              enable_cpu_cache_flush=True)
    else:
        evaluator = ms.runner.EvaluatorConfig(number=config.number, repeat=1,
                                              min_repeat_ms=int(config.min_repeat_ms), enable_cpu_cache_flush=False)
    if runner is not None:
        return runner
    if deployment.is_remote:
        from omnic.remote.runner import make_rpc_runner  # lazy: RPC is only needed for remote devices

        return make_rpc_runner(deployment, evaluator)
    return ms.runner.LocalRunner(evaluator_config=evaluator)


# ------------------------------------------------------------------------------ measure callback
def _make_callback(state: _Progress) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class OmnicProgress(ms.measure_callback.PyMeasureCallback):
        """Counts trials, tracks the best latency and writes the ledger after every batch.

        Runs after MetaSchedule's own callbacks, so the batch's records are already on disk when
        the ledger says they exist.
        """

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            task = state.task
            n = len(runner_results)
            state.trials += n
            if task is not None:
                task.trials_run += n
                for rr in runner_results:
                    secs = [float(s) for s in (rr.run_secs or [])]
                    if rr.error_msg is None and secs and max(secs) < 1e9:
                        ms_ = 1e3 * sum(secs) / len(secs)
                        task.best_ms = ms_ if task.best_ms is None else min(task.best_ms, ms_)
                _ledger_entry(task, state.ledger)
                _write_ledger(state.ledger_path, state.ledger)
                if task.best_ms is not None:
                    state.total_ms[task.key] = task.model_ms
            if state.bar is not None:
                state.bar.update(n)
                best = "-" if task is None or task.best_ms is None else f"{task.best_ms:.4f}ms"
                state.bar.set_postfix_str(
                    f"{task.name if task else ''} best {best} | model est {sum(state.total_ms.values()):.3f}ms",
                    refresh=False)

    return OmnicProgress()


# ----------------------------------------------------------------------------------- the planner
def _extract(prepared: Any, target: Any, config: TuningConfig) -> list[_Task]:
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops, find_anchor_sblock

    calls = _calls_per_anchor(prepared)
    tasks = []
    for t in ms.relax_integration.extract_tasks(prepared, target, module_equality=MODULE_EQUALITY):
        mod = t.dispatched[0]
        try:
            flops = float(estimate_tir_flops(mod))
        except Exception:  # noqa: BLE001 - data movement without arithmetic
            flops = 0.0
        anchor = find_anchor_sblock(mod)  # the same key MetaSchedule's anchor-block equality uses
        key = str(tvm_ffi.structural_hash(anchor if anchor is not None else mod))
        task = _Task(name=t.task_name, key=key, weight=calls.get(key, int(t.weight)), flops=flops, extracted=t,
                     space=schedule_rules.space_revision(mod, target))
        if any(task.name.startswith(p) for p in config.skip_prefixes):
            task.status = "skipped"
        tasks.append(task)
    # heaviest first; ties (zero-FLOP data movement) by name, for a stable order
    tasks.sort(key=lambda t: (-t.heaviness, t.name))
    return tasks


def _calls_per_anchor(prepared: Any) -> dict[str, int]:
    """Call sites in ``main`` per anchor op (MetaSchedule's anchor-block extraction over-counts
    merged tasks: three conv variants came back with weight 4)."""
    import collections

    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir.analysis import find_anchor_sblock

    sites: collections.Counter[str] = collections.Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            sites[expr.args[0].name_hint] += 1

    for _, func in prepared.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    per_anchor: collections.Counter[str] = collections.Counter()
    for gv, func in prepared.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and sites[gv.name_hint]:
            anchor = find_anchor_sblock(tvm.IRModule({"main": func}))
            if anchor is not None:
                per_anchor[str(tvm_ffi.structural_hash(anchor))] += sites[gv.name_hint]
    return dict(per_anchor)


def _classify(tasks: Sequence[_Task], db: Any, ledger: dict[str, Any]) -> None:
    for task in tasks:
        if task.status == "skipped":
            continue
        entry = ledger["tasks"].get(task.key)
        if entry is not None:
            task.trials_before = int(entry.get("trials", 0))
            task.best_ms = entry.get("best_ms")
            task.status = "done" if entry.get("complete") else ("partial" if task.trials_before else "new")
            if task.space > int(entry.get("space", 0)):
                # tuned before omnic's rules for it (or their current revision) existed: its new
                # design space gets tuned too; the old records stay and compete
                task.status, task.trials_before = "new", 0
            continue
        mod = task.extracted.dispatched[0]
        # has_workload alone is not enough: MetaSchedule commits the workload when a task *starts*
        if db.has_workload(mod) and len(db.get_top_k(db.commit_workload(mod), 1)) > 0:
            task.status = "done"


def _plan(tasks: Sequence[_Task], trials: int) -> int:
    """Mark the tasks this run tunes and return its trial budget.

    A resumed (partial) task's earlier trials count against the budget, so that a run killed
    half way and then repeated with the same budget runs only the trials it still lacks. With a
    budget smaller than one batch per task the heaviest tasks get theirs first; the rest stay
    untuned, for a later compile with budget left.
    """
    todo = [t for t in tasks if t.status in ("new", "partial")]
    budget = trials - sum(t.trials_before for t in todo if t.status == "partial")
    if not todo or trials <= 0:
        return 0
    if budget <= 0:  # an interrupted run had already spent this budget
        for task in todo:
            task.status = "done"
        return 0
    for task in todo:
        task.planned = True
    return budget


def _warmup(config: TuningConfig) -> int:
    """Measured samples before the XGBoost model ranks candidates (random before that).

    Two batches: the model is shared by every task of the run and trained on relative
    throughput per workload, so a few dozen samples already rank candidates better than chance;
    MetaSchedule's 100 spent the first minutes of a short run on random search.
    """
    if config.warmup_samples is not None:
        return config.warmup_samples
    return 2 * config.trials_per_iter


def _model_estimate_ms(tasks: Sequence[_Task]) -> float | None:
    known = [t.model_ms for t in tasks if t.best_ms is not None]
    return round(sum(known), 6) if known else None


def tune(prepared: Any, deployment: Deployment, target: Any, *, trials: int | None = None,
         time_budget_s: float | None = None, config: TuningConfig | None = None, runner: Any = None,
         progress: bool = True, database_path: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Tune the new tasks of ``prepared`` into the device's persistent database.

    Args:
        prepared: The module from ``pipeline.prepare`` (fused, layout-free attributes).
        deployment: Supplies the device, precision and (unless overridden) the budgets.
        target: The TVM target the module is built for (must carry ``num-cores`` on CPUs).
        trials: Trial budget for this run (default ``deployment.tuning_trials``). With 0 and a
            time budget, the trials are estimated from the time budget.
        time_budget_s: Wall-clock budget (default ``deployment.tuning_time_s``); tuning stops at
            the first batch that ends after it.
        config: Search settings.
        runner: A MetaSchedule runner to measure candidates with (default: local, or the RPC
            runner of a remote deployment).
        progress: Show a tqdm bar (tasks, trials, best latency so far).
        database_path: Database folder (default :func:`database_dir`).

    Returns:
        ``(database, report)``; ``report`` has ``tasks`` (extracted), ``tasks_in_database``,
        ``new_tasks`` (needing trials), ``tasks_tuned``, ``trials``, ``wall_s``, and more.
    """
    from tvm.s_tir import meta_schedule as ms

    config = config or TuningConfig()
    trials = deployment.tuning_trials if trials is None else int(trials)
    time_budget_s = deployment.tuning_time_s if time_budget_s is None else time_budget_s
    if trials < 0 or (time_budget_s is not None and time_budget_s < 0):
        raise TuningError(f"tuning budgets must be >= 0, got trials={trials}, time_budget_s={time_budget_s}")
    t0 = time.monotonic()
    path = Path(database_path) if database_path is not None else database_dir(deployment, target)
    if trials == 0 and time_budget_s:
        trials = max(config.trials_per_iter, int(time_budget_s / config.seconds_per_trial))
    if deployment.spec.kind == "cpu" and not deployment.is_remote and "num-cores" in target.attrs:
        # the runner's worker process inherits this; unset, TVM times candidates on cores/2 threads
        os.environ.setdefault("TVM_NUM_THREADS", str(int(target.attrs["num-cores"])))

    schedule_rules.register()
    with _locked(path):
        _light_tensor_intrinsics(target)
        db = open_database(path)
        ledger_path = path / LEDGER
        ledger = _read_ledger(ledger_path)
        tasks = _extract(prepared, target, config)
        _classify(tasks, db, ledger)
        budget = _plan(tasks, trials)
        planned = [t for t in tasks if t.planned]
        report: dict[str, Any] = {
            "database": str(path),
            "tasks": len(tasks),
            "tasks_in_database": sum(t.status == "done" for t in tasks),
            "new_tasks": sum(t.status in ("new", "partial") for t in tasks),
            "resumed_tasks": sum(t.status == "partial" and t.planned for t in tasks),
            "skipped_tasks": [t.name for t in tasks if t.status == "skipped"],
            "budget": {"trials": trials, "time_s": time_budget_s},
        }
        state = _Progress(bar=None, ledger=ledger, ledger_path=ledger_path,
                          deadline=None if not time_budget_s else t0 + float(time_budget_s))
        if planned:
            _run(planned, budget, db, path, deployment, config, runner, state, progress)
        report.update({
            "tasks_tuned": sum(t.trials_run > 0 for t in tasks),
            "tasks_completed": sum(t.complete for t in tasks),
            "trials": state.trials,
            "stopped_by_time": state.stopped_by_time,
            "wall_s": round(time.monotonic() - t0, 3),
            "estimated_model_ms": _model_estimate_ms(tasks),
            "per_task": [{"name": t.name, "weight": t.weight, "flops": t.flops, "status": t.status,
                          "trials_before": t.trials_before, "trials_run": t.trials_run,
                          "batches": t.batches, "best_ms": t.best_ms, "history": t.history} for t in tasks],
        })
        if planned:
            report["builder"] = state.builder_kind
        return db, report


def _run(planned: list[_Task], budget: int, db: Any, path: Path, deployment: Deployment, config: TuningConfig,
         runner: Any, state: _Progress, progress: bool) -> None:
    """Spend ``budget`` trials (or the time budget) on ``planned``, one MetaSchedule job per batch.

    One job per batch: the deadline is checked between batches (terminating a task from a
    callback trips MetaSchedule's own bookkeeping), records reach the disk after every batch, and
    each job's evolutionary search is seeded with the task's best records so far.
    """
    from tvm.s_tir import meta_schedule as ms

    per_iter = config.trials_per_iter
    runner_obj = _make_runner(deployment, config, runner)
    state.builder_kind = _builder_kind(config, budget)
    builder = _make_builder(config, state.builder_kind)
    warmup = _warmup(config)
    # one model for all tasks of the run: what it learns on one conv carries to the next
    cost_model = ms.cost_model.XGBModel(num_warmup_samples=warmup) \
        if config.cost_model == "xgb" else ms.cost_model.RandomModel()
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_make_callback(state)]
    if progress:
        from tqdm.auto import tqdm

        state.bar = tqdm(total=budget, unit="trial", desc=f"tuning {len(planned)} task(s)",
                         file=sys.stderr, dynamic_ncols=True)
    strategy = ms.search_strategy.EvolutionarySearch(population_size=config.population_size,
                                                     genetic_num_iters=config.genetic_num_iters)
    # Until the cost model has its warm-up samples it ranks candidates at random, so evolving a
    # large population is wasted work (a third of a batch on 2 cores): sample, do not evolve.
    sampling = ms.search_strategy.EvolutionarySearch(population_size=max(2 * per_iter, 32), genetic_num_iters=0)
    empty_batches: dict[str, int] = {}
    batch = 0
    try:
        while state.trials < budget:
            active = [t for t in planned if not t.complete]
            if not active:
                break
            # the very first batch always runs, so that even a budget shorter than one
            # batch makes progress across repeated compiles
            if batch > 0 and state.deadline is not None and time.monotonic() >= state.deadline:
                state.stopped_by_time = True
                break
            task = _next_task(active, per_iter)
            state.task = task
            if state.bar is not None:
                state.bar.set_description(f"task {planned.index(task) + 1}/{len(planned)} {task.name}",
                                          refresh=True)
            n = min(per_iter, budget - state.trials)
            _quiet_metaschedule_console()  # both calls below reconfigure its logging
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task.extracted], work_dir=str(path),
                strategy=sampling if config.cost_model == "xgb" and state.trials < warmup else strategy,
                seed=config.seed + 7919 * batch + task.trials_before + task.trials_run)
            before = task.trials_run
            ms.tune.tune_tasks(
                tasks=ctxs, task_weights=weights, work_dir=str(path), max_trials_global=n,
                max_trials_per_task=n, num_trials_per_iter=n, builder=builder, runner=runner_obj,
                database=db, cost_model=cost_model, measure_callbacks=callbacks,
                task_scheduler="round-robin", module_equality=MODULE_EQUALITY)
            batch += 1
            task.batches += 1
            if task.best_ms is not None:
                task.history.append(task.best_ms)
            # two batches in a row without a new candidate: the search space has run dry
            empty_batches[task.key] = empty_batches.get(task.key, 0) + 1 if task.trials_run == before else 0
            if empty_batches[task.key] >= 2 or (task.best_ms is None and task.trials_run > before):
                # (or every candidate of its first batch failed: nothing to build on)
                _finish(task, state.ledger)
                _write_ledger(state.ledger_path, state.ledger)
        if not state.stopped_by_time:  # the budget is spent: every task got what this run judged it worth
            for task in planned:  # (one the budget never reached stays new, for a later compile)
                if not task.complete and (task.trials_run or task.trials_before):
                    _finish(task, state.ledger)
            _write_ledger(state.ledger_path, state.ledger)
    finally:
        if state.bar is not None:
            state.bar.close()
        if hasattr(builder, "close"):
            builder.close()  # the pool's workers hold a GB between them


def _ledger_entry(task: _Task, ledger: dict[str, Any]) -> dict[str, Any]:
    """The task's ledger entry, brought up to date (after each batch and when it finishes).

    The rules' ``space`` revision is recorded with the first batch, so that an unfinished task
    of the current revision resumes as partial instead of being reopened as new.
    """
    entry = ledger["tasks"].setdefault(task.key, {"name": task.name, "trials": 0, "complete": False})
    entry.update(trials=task.trials_before + task.trials_run, best_ms=task.best_ms)
    if task.space:
        entry["space"] = task.space
    return entry


def _finish(task: _Task, ledger: dict[str, Any]) -> None:
    task.complete = True
    _ledger_entry(task, ledger)["complete"] = True


def _snapshot_for(path: Path, target: Any):
    if not (path / "database_workload.json").exists():
        return None
    _light_tensor_intrinsics(target)  # tuned traces may name tensor intrinsics
    return open_snapshot(path)


_DEFAULT_CONFIG: list[TuningConfig] = [TuningConfig()]


@contextlib.contextmanager
def using(config: TuningConfig) -> Iterator[TuningConfig]:
    """Make ``config`` the search settings of every compile inside the ``with`` block.

    ``engine.compile`` takes its budget from the deployment; this is how callers (tests, the
    benchmark) change *how* it searches without widening the engine's signature.
    """
    _DEFAULT_CONFIG.append(config)
    try:
        yield config
    finally:
        _DEFAULT_CONFIG.pop()


def database_for(prepared: Any, deployment: Deployment, target: Any, *, progress: bool = True,
                 config: TuningConfig | None = None, runner: Any = None) -> tuple[Any, dict[str, Any]]:
    """The database ``engine.compile`` applies, after tuning new tasks when the deployment asks.

    Tuning runs when ``deployment.tuning_trials > 0`` or ``deployment.tuning_time_s`` is set.
    Otherwise the existing database (if any) is applied as is, with no task extraction.
    GPU devices without a tracker cannot be measured from here: their tuning is skipped (said in
    the report) and an existing database is still applied.

    Returns:
        ``(database or None, report)``; the report always has ``trials``, ``tasks``, ``new_tasks``.
    """
    path = database_dir(deployment, target)
    wants = deployment.tuning_trials > 0 or bool(deployment.tuning_time_s)
    base = {"trials": 0, "tasks": 0, "new_tasks": 0, "database": str(path)}
    if wants and deployment.spec.kind != "cpu" and not deployment.is_remote and runner is None:
        return _snapshot_for(path, target), {
            **base, "skipped": f"{deployment.device} is not measurable here; attach it through a tracker to tune it"}
    if not wants:
        return _snapshot_for(path, target), base
    return tune(prepared, deployment, target, config=config or _DEFAULT_CONFIG[-1], runner=runner,
                progress=progress)


# ------------------------------------------------------------------------------------------ CLI
def register_cli(subparsers: Any) -> None:
    """``omnic tune MODEL --trials N --time-s S``: tune a model's new tasks into the device's
    database (``compile`` reuses them), and print what was tuned."""
    from omnic.cli.common import add_model_args

    p = subparsers.add_parser("tune", help="tune a model's new tasks into the device's persistent database")
    add_model_args(p)
    p.add_argument("--time-s", type=float, default=None, help="wall-clock budget (tasks heaviest first)")
    p.add_argument("--per-iter", type=int, default=TuningConfig.trials_per_iter, help="trials per batch")
    p.add_argument("--population", type=int, default=TuningConfig.population_size)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: Any) -> int:
    from omnic import engine
    from omnic.cli.common import deployment_from, emit, load_model_spec, parse_shape

    if not args.trials and not args.time_s:
        raise TuningError("give a budget: --trials N and/or --time-s SECONDS")
    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    deployment = deployment_from(args).replace(tuning_time_s=args.time_s)
    with using(TuningConfig(trials_per_iter=args.per_iter, population_size=args.population)):
        dm = engine.compile(model, deployment, x)
    rep = dm.report["tuning"]
    text = (f"{rep.get('tasks', 0)} tasks: {rep.get('tasks_in_database', 0)} already in the database, "
            f"{rep.get('tasks_tuned', 0)} tuned now with {rep['trials']} trials in {rep.get('wall_s', 0)} s"
            f"{' (time budget spent)' if rep.get('stopped_by_time') else ''}; estimated kernel time "
            f"{rep.get('estimated_model_ms')} ms; database {rep['database']}")
    emit(args, rep, text)
    return 0
