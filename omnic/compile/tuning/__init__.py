"""MetaSchedule tuning with a persistent, shared database per device, target and precision.

How a compile uses it (``engine.compile`` -> :func:`database_for`):

1. The tuning tasks are extracted from the *prepared* module (fused, layout-free weights), which
   is exactly what ``build.build`` applies the database to; a workload tuned on anything else
   would never match.
2. One ``JSONDatabase`` per device/target/precision lives under ``<cache>/tuning/<tag>/``
   (:mod:`~omnic.compile.tuning.database`). It is shared by every model: workloads are keyed by
   their anchor op (the conv or matmul of a fused kernel, shapes included, weights and
   elementwise epilogue not; :data:`MODULE_EQUALITY`), so a second compile of a model tunes
   nothing, a model sharing layers with an earlier one tunes only its new tasks, and the
   epilogue variants of one conv inside a model are one task.
3. The planner (:mod:`~omnic.compile.tuning.planner`) gives every task one batch, heaviest
   first, then each batch to the task expected to save the most model time; tuning stops when
   the trial budget or the time budget (``Deployment.tuning_time_s``) is spent
   (:mod:`~omnic.compile.tuning.run`).
4. ``build`` applies the database kernel by kernel (:mod:`~omnic.compile.tuning.replay`): a
   record tuned on one epilogue of a conv does not always replay onto another; then the next
   record is tried, else the kernel keeps its untuned schedule, the report says so, and the
   failure is remembered next to the database. A record never fails a build.

Interrupted runs (``kill -9`` included): ``JSONDatabase`` appends each record as it commits, so
every finished batch survives. A small ledger next to the database
(:mod:`~omnic.compile.tuning.ledger`, written after every batch) says how many trials each
workload got and whether its tuning finished. On the next run a finished task counts as done;
an unfinished one is tuned on, and its earlier trials count against the budget, so a killed run
repeated with the same budget runs only what it still lacks (its earlier records seed the
evolutionary search, so the search resumes rather than restarts).

Per-trial cost is kept low (:mod:`~omnic.compile.tuning.builders`, :class:`TuningConfig`): a
builder without MetaSchedule's per-batch process pool (in-process for small runs, else a
persistent pool), ``fast_build`` (no tensor intrinsics import), a smaller evolutionary
population, a cost model that leaves its random warm-up after two batches, and no evolution
while it is still random.
"""
from __future__ import annotations

from omnic.compile.tuning.builders import fast_build, light_tensor_intrinsics
from omnic.compile.tuning.config import TuningConfig, current, using
from omnic.compile.tuning.database import (MODULE_EQUALITY, database_dir, locked, open_database, open_snapshot,
                                           repair_jsonl, state_digest)
from omnic.compile.tuning.ledger import LEDGER, LEDGER_VERSION
from omnic.compile.tuning.replay import REPLAY_FAILURES, KernelReplay, apply_database
from omnic.compile.tuning.report import TuningReport
from omnic.compile.tuning.run import database_for, tune

__all__ = ["LEDGER", "LEDGER_VERSION", "MODULE_EQUALITY", "REPLAY_FAILURES", "KernelReplay", "TuningConfig", "current",
           "TuningReport", "apply_database", "database_dir", "database_for", "fast_build", "light_tensor_intrinsics",
           "locked", "open_database", "open_snapshot", "repair_jsonl", "state_digest", "tune", "using"]
