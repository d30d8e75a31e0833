"""Which tasks a run tunes, in which order, and what each has had so far.

Every new task first gets one batch, heaviest first (FLOPs x occurrences), so a short budget
buys coverage of the heavy tasks first (an untuned kernel is many times slower than a tuned
one). After that each batch goes to the task with the largest claim (:meth:`Task.claim`,
Ansor's gradient estimate), so trials follow each task's share of the model's time and leave a
task that has stopped improving; a fixed split made after one batch each gave most of a run to
a small kernel whose first batch happened to be slow.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Sequence

import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops, find_anchor_sblock

from omnic.compile.rules.marking import space_revision
from omnic.compile.tuning.config import TuningConfig
from omnic.compile.tuning.database import MODULE_EQUALITY

#: Weight of the measured (backward) improvement in a task's claim; Ansor uses 0.2. Higher here,
#: because a run of a few hundred trials must leave a converged conv early.
BACKWARD_SHARE = 0.5


@dataclass(kw_only=True)
class Task:
    """One extracted task and its place in the run."""

    name: str
    key: str  # hash of the workload's anchor op (the database's key, see MODULE_EQUALITY)
    weight: int
    flops: float
    extracted: Any  # ms.ExtractedTask; anything in the planner's tests
    status: str = "new"  # new | partial | done | skipped
    trials_before: int = 0  # trials earlier runs gave it (a resumed, partial task)
    planned: bool = False  # part of this run
    trials_run: int = 0
    batches: int = 0
    best_ms: float | None = None
    default_ms: float | None = None  # its default schedule's time, measured as the trials are
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
        return self.model_ms * (BACKWARD_SHARE * backward + (1.0 - BACKWARD_SHARE) * forward)

    def summary(self) -> dict[str, Any]:
        """The task's row in the tuning report's ``per_task``."""
        return {"name": self.name, "weight": self.weight, "flops": self.flops, "status": self.status,
                "trials_before": self.trials_before, "trials_run": self.trials_run, "batches": self.batches,
                "best_ms": self.best_ms, "default_ms": self.default_ms, "history": self.history}


def next_task(active: Sequence[Task], per_iter: int = 16) -> Task:
    """First batch for every task (in the planned, heaviest-first order), then the largest claim."""
    for task in active:
        if task.batches == 0 and task.trials_before == 0:
            return task
    return max(active, key=lambda t: t.claim(per_iter))


def extract_tasks(prepared: tvm.IRModule, target: tvm.target.Target, config: TuningConfig) -> list[Task]:
    """The module's tuning tasks, heaviest first (skipped ones marked)."""
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
        task = Task(name=t.task_name, key=key, weight=calls.get(key, int(t.weight)), flops=flops, extracted=t,
                    space=space_revision(mod, target))
        if any(task.name.startswith(p) for p in config.skip_prefixes):
            task.status = "skipped"
        tasks.append(task)
    # heaviest first; ties (zero-FLOP data movement) by name, for a stable order
    tasks.sort(key=lambda t: (-t.heaviness, t.name))
    return tasks


def _calls_per_anchor(prepared: tvm.IRModule) -> dict[str, int]:
    """Call sites in ``main`` per anchor op (MetaSchedule's anchor-block extraction over-counts
    merged tasks, so its weights cannot be used)."""
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


def classify(tasks: Sequence[Task], db: ms.database.Database, ledger: dict[str, Any]) -> None:
    """Set each task's status (new, partial or done) from the ledger and the database.

    A workload that has records but no ledger entry (a database copied from elsewhere) counts
    as done; one tuned before omnic's rules for it (or their current revision) existed is new.
    """
    for task in tasks:
        if task.status == "skipped":
            continue
        entry = ledger["tasks"].get(task.key)
        if entry is not None:
            task.trials_before = int(entry.get("trials", 0))
            task.best_ms = entry.get("best_ms")
            task.status = "done" if entry.get("complete") else ("partial" if task.trials_before else "new")
            if task.space > int(entry.get("space", 0)):
                # its new design space gets tuned too; the old records stay and compete
                task.status, task.trials_before = "new", 0
            continue
        mod = task.extracted.dispatched[0]
        # has_workload alone is not enough: MetaSchedule commits the workload when a task *starts*
        if db.has_workload(mod) and len(db.get_top_k(db.commit_workload(mod), 1)) > 0:
            task.status = "done"


def plan(tasks: Sequence[Task], trials: int) -> int:
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


def ledger_entry(task: Task, ledger: dict[str, Any]) -> dict[str, Any]:
    """The task's ledger entry, brought up to date (after each batch and when it finishes).

    The rules' ``space`` revision is recorded with the first batch, so that an unfinished task
    of the current revision resumes as partial instead of being reopened as new.
    """
    entry = ledger["tasks"].setdefault(task.key, {"name": task.name, "trials": 0, "complete": False})
    entry.update(trials=task.trials_before + task.trials_run, best_ms=task.best_ms)
    if task.space:
        entry["space"] = task.space
    return entry


def finish(task: Task, ledger: dict[str, Any]) -> None:
    """Mark ``task`` finished, in the run and in the ledger."""
    task.complete = True
    ledger_entry(task, ledger)["complete"] = True


def model_estimate_ms(tasks: Sequence[Task]) -> float | None:
    """The model's kernel time as far as its tasks have been measured (None: nothing measured)."""
    known = [t.model_ms for t in tasks if t.best_ms is not None]
    return round(sum(known), 6) if known else None
