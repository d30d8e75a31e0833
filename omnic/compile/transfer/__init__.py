"""Transfer-tuning: give a kernel the database has no record for the tuned schedule of the most
similar workload it does have (Gibson & Cano, "Transfer-Tuning", PACT 2022).

The subnets of a supernet, or a model at another width or resolution, run the same ops as the
model that was tuned, with other channel counts and spatial sizes. Their kernels are new
workloads to MetaSchedule's database, so an exact-record replay
(:mod:`omnic.compile.tuning.replay`) leaves them untuned. Here every such kernel gets the trace
of a tuned workload of its *family* (same anchor op, layouts, kernel window, stride, dilation,
groups and dtype; any epilogue; see :func:`family_of`), nearest in loop extents first:

1. The trace's sampling decisions are re-fitted to the kernel (:func:`refit_tile`): a
   ``SamplePerfectTile`` decision must multiply to the loop's new extent, so inner factors that
   divide what is left are kept and the others become the nearest divisor (a new innermost
   factor fills whole vectors); the constant tiles of omnic's own rules are re-fitted the same
   way; categorical decisions (unroll depth, compute locations) are kept.
2. The trace is applied without its postprocessing part (whose fused loops and weight layouts
   follow the old tile sizes), then MetaSchedule's postprocessors for the target run on the
   result, as they do on every candidate during tuning.
3. Any error tries the next record, then the next workload; a kernel that nothing fits is left
   to the default rules.

Finding a transferred schedule measures nothing: a kernel costs a few replays of a trace (tens
of milliseconds). Whether it or the default rules' schedule runs is the build's :data:`CHOICE`
(:mod:`~omnic.compile.transfer.choice`): keep every transfer, keep only near ones, or time both
kernels at build time (the default, on this machine's CPU; each decision is remembered next to
the database, so the next build of the kernel times nothing). Kernels whose nearest relative's
tuning did not beat its default schedule (the ledger's ``default_ms``) keep their default.
``build.build_result`` runs :func:`transfer_schedules` on CPU targets between the exact-record
replay and the default rules.
"""
from __future__ import annotations

from omnic.compile.transfer.apply import ERROR_LIMIT, KernelTransfer, transfer_schedules
from omnic.compile.transfer.choice import (CHOICE, CHOICES, DECISIONS, GUARD_DISTANCE, MEASURE_ROUNDS,
                                           faster_than_default, kernel_ms, kernel_timer, policy)
from omnic.compile.transfer.family import (MAX_RECORDS, MAX_WORKLOADS, Family, Source, distance, family_of,
                                           index_database, nearest)
from omnic.compile.transfer.refit import apply_refitted, refit_tile, strip_postproc

__all__ = ["CHOICE", "CHOICES", "DECISIONS", "ERROR_LIMIT", "GUARD_DISTANCE", "MAX_RECORDS", "MAX_WORKLOADS", "MEASURE_ROUNDS",
           "Family", "KernelTransfer", "Source", "apply_refitted", "distance", "family_of", "faster_than_default",
           "index_database", "kernel_ms", "kernel_timer", "nearest", "policy", "refit_tile", "strip_postproc",
           "transfer_schedules"]
