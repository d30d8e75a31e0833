"""A tuning run: :func:`database_for` (what ``engine.compile`` calls) and :func:`tune`.

One MetaSchedule job per batch (instead of one job over all tasks) makes records reach the disk
after every batch: MetaSchedule's gradient scheduler commits nothing until every task has had
its first batch (minutes for a real network). It also lets the deadline be checked between
batches, and seeds each job's evolutionary search with the task's best records so far.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tqdm.auto import tqdm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from omnic.compile import rules
import omnic.compile.tuning.builders as builders
from omnic.compile.tuning.config import TuningConfig, current, warmup_samples
from omnic.compile.tuning.database import (MODULE_EQUALITY, database_dir, locked, open_database, open_snapshot,
                                           run_ms)
from omnic.compile.tuning.defaults import default_ms, measure_defaults, record_defaults
from omnic.compile.tuning.ledger import LEDGER, read_ledger, write_ledger
from omnic.compile.tuning.planner import (Task, classify, extract_tasks, finish, ledger_entry, model_estimate_ms,
                                          next_task, plan)
from omnic.compile.tuning.report import TuningReport
from omnic.core.deployment import Deployment
from omnic.core.errors import TuningError

#: a task whose search space yields no new candidate in this many batches in a row is finished
EMPTY_BATCHES_TO_FINISH = 2
#: spreads the seeds of consecutive batches (a prime, so batch and trial offsets do not collide)
SEED_STRIDE = 7919


@dataclass
class _Progress:
    """State the measure callback shares with the tuning loop."""

    bar: Any
    ledger: dict[str, Any]
    ledger_path: Path
    deadline: float | None
    task: Task | None = None
    trials: int = 0
    stopped_by_time: bool = False
    total_ms: dict[str, float] = field(default_factory=dict)
    builder_kind: str = ""


@derived_object
class _OmnicProgress(ms.measure_callback.PyMeasureCallback):
    """Counts trials, tracks the best latency and writes the ledger after every batch.

    Runs after MetaSchedule's own callbacks, so the batch's records are already on disk when
    the ledger says they exist.
    """

    def __init__(self, state: _Progress):
        super().__init__()
        self.state = state

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        state = self.state
        task = state.task
        n = len(runner_results)
        state.trials += n
        if task is not None:
            task.trials_run += n
            for rr in runner_results:
                ms_ = run_ms(rr.run_secs) if rr.error_msg is None else None
                if ms_ is not None:
                    task.best_ms = ms_ if task.best_ms is None else min(task.best_ms, ms_)
            ledger_entry(task, state.ledger)
            write_ledger(state.ledger_path, state.ledger)
            if task.best_ms is not None:
                state.total_ms[task.key] = task.model_ms
        if state.bar is not None:
            state.bar.update(n)
            best = "-" if task is None or task.best_ms is None else f"{task.best_ms:.4f}ms"
            state.bar.set_postfix_str(
                f"{task.name if task else ''} best {best} | model est {sum(state.total_ms.values()):.3f}ms",
                refresh=False)


def tune(prepared: tvm.IRModule, deployment: Deployment, target: tvm.target.Target, *, trials: int | None = None,
         time_budget_s: float | None = None, config: TuningConfig | None = None,
         runner: ms.runner.Runner | None = None, progress: bool = True,
         database_path: Path | None = None) -> tuple[ms.database.JSONDatabase, TuningReport]:
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
        ``(database, report)``; the report has every field of a run (:class:`TuningReport`).
    """
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

    rules.register()
    with locked(path):
        builders.light_tensor_intrinsics(target)
        db = open_database(path)
        ledger_path = path / LEDGER
        ledger = read_ledger(ledger_path)
        tasks = extract_tasks(prepared, target, config)
        classify(tasks, db, ledger)
        budget = plan(tasks, trials)
        planned = [t for t in tasks if t.planned]
        # counted before the run, which finishes tasks
        in_database = sum(t.status == "done" for t in tasks)
        new_tasks = sum(t.status in ("new", "partial") for t in tasks)
        resumed = sum(t.status == "partial" and t.planned for t in tasks)
        state = _Progress(bar=None, ledger=ledger, ledger_path=ledger_path,
                          deadline=None if not time_budget_s else t0 + float(time_budget_s))
        if planned:
            _run(planned, budget, db, path, deployment, target, config, runner, state, progress)
        return db, TuningReport(
            database=str(path), tasks=len(tasks), tasks_in_database=in_database, new_tasks=new_tasks,
            resumed_tasks=resumed, skipped_tasks=[t.name for t in tasks if t.status == "skipped"],
            budget={"trials": trials, "time_s": time_budget_s},
            tasks_tuned=sum(t.trials_run > 0 for t in tasks), tasks_completed=sum(t.complete for t in tasks),
            trials=state.trials, stopped_by_time=state.stopped_by_time,
            wall_s=round(time.monotonic() - t0, 3), estimated_model_ms=model_estimate_ms(tasks),
            per_task=[t.summary() for t in tasks], builder=state.builder_kind if planned else None)


def _run(planned: list[Task], budget: int, db: ms.database.Database, path: Path, deployment: Deployment,
         target: tvm.target.Target, config: TuningConfig, runner: ms.runner.Runner | None, state: _Progress,
         progress: bool) -> None:
    """Spend ``budget`` trials (or the time budget) on ``planned``, one MetaSchedule job per batch.

    The deadline is checked between batches because terminating a task from a callback trips
    MetaSchedule's own bookkeeping.
    """
    per_iter = config.trials_per_iter
    runner_obj = builders.make_runner(deployment, config, runner)
    state.builder_kind = builders.builder_kind(config, budget)
    builder = builders.make_builder(config, state.builder_kind)
    warmup = warmup_samples(config)
    # one model for all tasks of the run: what it learns on one conv carries to the next
    cost_model = ms.cost_model.XGBModel(num_warmup_samples=warmup) \
        if config.cost_model == "xgb" else ms.cost_model.RandomModel()
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_OmnicProgress(state)]
    if progress:
        state.bar = tqdm(total=budget, unit="trial", desc=f"tuning {len(planned)} task(s)",
                         file=sys.stderr, dynamic_ncols=True)
    strategy = ms.search_strategy.EvolutionarySearch(population_size=config.population_size,
                                                     genetic_num_iters=config.genetic_num_iters)
    # Until the cost model has its warm-up samples it ranks candidates at random, so evolving a
    # large population is wasted work: sample, do not evolve.
    sampling = ms.search_strategy.EvolutionarySearch(population_size=max(2 * per_iter, 32), genetic_num_iters=0)
    empty_batches: dict[str, int] = {}
    batch = 0
    try:
        if deployment.spec.kind == "cpu" and config.time_defaults:
            _time_defaults(planned, target, builder, runner_obj, state)
        while state.trials < budget:
            active = [t for t in planned if not t.complete]
            if not active:
                break
            # the very first batch always runs, so that even a budget shorter than one
            # batch makes progress across repeated compiles
            if batch > 0 and state.deadline is not None and time.monotonic() >= state.deadline:
                state.stopped_by_time = True
                break
            task = next_task(active, per_iter)
            state.task = task
            if state.bar is not None:
                state.bar.set_description(f"task {planned.index(task) + 1}/{len(planned)} {task.name}",
                                          refresh=True)
            n = min(per_iter, budget - state.trials)
            builders.quiet_metaschedule_console()  # both calls below reconfigure its logging
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task.extracted], work_dir=str(path),
                strategy=sampling if config.cost_model == "xgb" and state.trials < warmup else strategy,
                seed=config.seed + SEED_STRIDE * batch + task.trials_before + task.trials_run)
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
            # batches in a row without a new candidate: the search space has run dry
            empty_batches[task.key] = empty_batches.get(task.key, 0) + 1 if task.trials_run == before else 0
            if empty_batches[task.key] >= EMPTY_BATCHES_TO_FINISH or (task.best_ms is None
                                                                      and task.trials_run > before):
                # (or every candidate of its first batch failed: nothing to build on)
                finish(task, state.ledger)
                write_ledger(state.ledger_path, state.ledger)
        if not state.stopped_by_time:  # the budget is spent: every task got what this run judged it worth
            for task in planned:  # (one the budget never reached stays new, for a later compile)
                if not task.complete and (task.trials_run or task.trials_before):
                    finish(task, state.ledger)
            write_ledger(state.ledger_path, state.ledger)
    finally:
        if state.bar is not None:
            state.bar.close()
        if hasattr(builder, "close"):
            builder.close()  # the pool's workers hold a GB between them


def _time_defaults(planned: list[Task], target: tvm.target.Target, builder: ms.builder.Builder,
                   runner: ms.runner.Runner, state: _Progress) -> None:
    """Time the default schedule of each planned task the ledger has no current time for (see
    :mod:`omnic.compile.tuning.defaults`), before its first trial."""
    for task in planned:
        task.default_ms = default_ms(state.ledger["tasks"].get(task.key))
    need = [t for t in planned if t.default_ms is None]
    if not need:
        return
    if state.bar is not None:
        state.bar.set_description(f"timing {len(need)} default schedule(s)", refresh=True)
    measured = measure_defaults([(t.key, t.extracted.dispatched[0]) for t in need], target, builder, runner)
    record_defaults(state.ledger, measured, {t.key: t.name for t in need})
    write_ledger(state.ledger_path, state.ledger)
    for task in need:
        task.default_ms = measured.get(task.key)


def database_for(prepared: tvm.IRModule, deployment: Deployment, target: tvm.target.Target, *,
                 progress: bool = True, config: TuningConfig | None = None,
                 runner: ms.runner.Runner | None = None) -> tuple[ms.database.Database | None, TuningReport]:
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
    if wants and deployment.spec.kind != "cpu" and not deployment.is_remote and runner is None:
        return _snapshot_for(path, target), TuningReport(
            database=str(path),
            skipped=f"{deployment.device} is not measurable here; attach it through a tracker to tune it")
    if not wants:
        return _snapshot_for(path, target), TuningReport(database=str(path))
    return tune(prepared, deployment, target, config=config or current(), runner=runner,
                progress=progress)


def _snapshot_for(path: Path, target: tvm.target.Target) -> ms.database.JSONDatabase | None:
    if not (path / "database_workload.json").exists():
        return None
    builders.light_tensor_intrinsics(target)  # tuned traces may name tensor intrinsics
    return open_snapshot(path)
