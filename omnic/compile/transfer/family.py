"""Families of kernels (which tuned traces may fit a kernel) and the distance between members,
and the tuning database's workloads indexed by family."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import tvm
import tvm_ffi
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops, find_anchor_sblock

from omnic.compile.tuning.database import run_ms
from omnic.compile.tuning.defaults import anchor_key

#: nearest workloads of a kernel's family tried, nearest first
MAX_WORKLOADS = 3
#: records tried per workload, best first
MAX_RECORDS = 3
#: extra distance of a source whose kernel has other blocks (another epilogue): between two
#: equally near sources, the one whose trace places the same blocks replays more often
EPILOGUE_PENALTY = 1e-3
#: ``IterVar.iter_type`` of spatial and reduction block iterators
_SPATIAL, _REDUCTION = 0, 2


@dataclass(frozen=True, kw_only=True)
class Family:
    """The part of a kernel that decides whether a tuned trace of another kernel fits it.

    Attributes:
        key: Hash of the anchor block with its loop extents left out (op, layouts, index
            arithmetic with stride and dilation, kernel window extents, dtypes, groups-ness).
        extents: The anchor block's remaining loop extents, in iterator order: what
            :func:`distance` compares within a family.
        blocks: Names of every block of the kernel (its epilogue included).
        dtype: The anchor's output dtype.
    """

    key: str
    extents: tuple[int, ...]
    blocks: frozenset[str]
    dtype: str = "float32"


@dataclass(frozen=True, kw_only=True)
class Source:
    """A tuned workload of the database.

    Attributes:
        workload: Short hash of the workload's module.
        family: Its family.
        records: Its best records, best first.
        gflops: The throughput its best record was measured at (0 when unknown).
        default_faster: Its default schedule, timed when it was tuned, is not slower than its
            best record: its tuning has nothing to pass on.
    """

    workload: str
    family: Family
    records: tuple[ms.database.TuningRecord, ...]
    gflops: float = 0.0
    default_faster: bool = False


def family_of(func: tvm.tirx.PrimFunc) -> Family | None:
    """The family of a kernel, keyed by its anchor block (the op with an init and the most
    FLOPs, as MetaSchedule's anchor-block equality); None without one or with dynamic loops.

    The key is the anchor block as text, with its iterators and buffers renamed by position,
    buffer shapes and loop extents removed, and omnic's per-kernel tags dropped. Extents of the
    reduction loops that slide over the input together with an output loop (the kernel window)
    stay in the key: a 3x3 trace is not transferred to a 1x1 conv. Stride and dilation are the
    constants of the index arithmetic, grouping the shape of the weight index, so they stay.
    """
    try:
        block = find_anchor_sblock(tvm.IRModule({"main": func}))
    except Exception:  # noqa: BLE001 - a kernel the analysis cannot read has no family
        return None
    if block is None:
        return None
    names = [str(iv.var.name) for iv in block.iter_vars]
    kinds = "".join({_SPATIAL: "S", _REDUCTION: "R"}.get(int(iv.iter_type), "O") for iv in block.iter_vars)
    extents = [getattr(iv.dom.extent, "value", None) for iv in block.iter_vars]
    if any(e is None for e in extents):
        return None
    window: set[int] = set()
    buffers: list[Any] = []
    for region in list(block.reads) + list(block.writes):
        if not any(region.source.same_as(b) for b in buffers):
            buffers.append(region.source)
        for rng in region.region:
            used = [k for k, n in enumerate(names) if re.search(rf"\b{re.escape(n)}\b", str(rng.min))]
            if len(used) > 1:
                window |= {k for k in used if kinds[k] == "R"}
    text = str(block)
    # iterators and buffers renamed by position; longest first, so that no name eats another
    renames = {n: f"i{k}" for k, n in enumerate(names)}
    renames.update({str(b.name): f"b{k}" for k, b in enumerate(buffers)})
    for old in sorted(renames, key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(old)}\b", renames[old], text)
    body = [line.strip() for line in text.splitlines()[1:]
            if not re.search(r"= T\.axis\.|= T\.Buffer\(|T\.sblock_attr\(", line)]
    annotations = sorted(f"{k}={v}" for k, v in block.annotations.items() if not str(k).startswith("omnic."))
    parts = [re.sub(r"\d+", "", str(block.name_hint)), kinds,
             ",".join(f"{k}:{extents[k]}" for k in sorted(window)),
             ",".join(f"{b.dtype}/{len(b.shape)}" for b in buffers), ";".join(annotations), "\n".join(body)]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return Family(key=key, extents=tuple(int(e) for k, e in enumerate(extents) if k not in window),
                  blocks=block_names(func), dtype=str(block.writes[0].source.dtype) if block.writes else "float32")


def distance(a: Family, b: Family) -> float:
    """How far apart two kernels of one family are: the sum over the anchor's loops of
    ``|log(extent_a / extent_b)|`` (0 for the same sizes; halving one channel count adds
    ``log 2``). Infinite across families."""
    if a.key != b.key or len(a.extents) != len(b.extents):
        return math.inf
    return sum(abs(math.log(x / y)) for x, y in zip(a.extents, b.extents) if x > 0 and y > 0)


def block_names(func: tvm.tirx.PrimFunc) -> frozenset[str]:
    """Names of every block of ``func`` (empty when it has no block structure)."""
    try:
        sch = Schedule(func)
        pending, names = list(sch.get_child_blocks(sch.get_sblock("root"))), set()
    except Exception:  # noqa: BLE001 - no root block: nothing to compare
        return frozenset()
    while pending:
        block = pending.pop()
        names.add(str(sch.get(block).name_hint))
        pending += list(sch.get_child_blocks(block))
    return frozenset(names)


def index_database(database: ms.database.Database, *, records: int = MAX_RECORDS,
                   defaults: Mapping[str, float] | None = None) -> dict[str, tuple[Source, ...]]:
    """The database's tuned workloads by family key, each with its ``records`` best records.

    Records that failed to build or run (MetaSchedule stores them with a huge latency) are left
    out; a workload whose anchor has no family is left out. ``defaults`` (anchor key -> the
    default schedule's milliseconds, :func:`omnic.compile.tuning.defaults.baselines`) marks the
    workloads whose tuning did not beat their default schedule.
    """
    by_workload: dict[Any, list[tuple[float, ms.database.TuningRecord]]] = {}
    for record in database.get_all_tuning_records():
        ms_ = run_ms(record.run_secs)
        if ms_ is not None:
            by_workload.setdefault(record.workload, []).append((ms_ / 1e3, record))
    index: dict[str, list[Source]] = {}
    for workload, scored in by_workload.items():
        funcs = [f for _, f in workload.mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        family = family_of(funcs[0]) if len(funcs) == 1 else None
        if family is None:
            continue
        scored.sort(key=lambda item: item[0])
        name = f"{tvm_ffi.structural_hash(workload.mod) & 0xFFFFFFFFFFFFFFFF:016x}"
        baseline = defaults.get(anchor_key(workload.mod)) if defaults else None
        index.setdefault(family.key, []).append(
            Source(workload=name, family=family, records=tuple(r for _, r in scored[:records]),
                   gflops=_flops(workload.mod) / scored[0][0] / 1e9,
                   default_faster=baseline is not None and 1e3 * scored[0][0] >= baseline))
    return {key: tuple(sorted(group, key=lambda s: s.workload)) for key, group in index.items()}


def nearest(family: Family, index: dict[str, tuple[Source, ...]], *, count: int = MAX_WORKLOADS,
            max_distance: float = math.inf) -> list[tuple[float, Source]]:
    """The ``count`` workloads of ``family`` nearest to it in ``index`` (within ``max_distance``),
    as ``(distance, source)``, best first.

    Best is nearest, less what a source's tuning is worth: among the ``count`` nearest, each
    ranks by its distance plus ``log(best / own)`` of the throughput its best record reached
    (``best``: the highest among them). A short tuning budget leaves some tasks barely searched,
    and a slightly farther source that was tuned well then makes the better trace. Among equals,
    a source with the kernel's very blocks (same epilogue) comes first.
    """
    near = []
    for source in index.get(family.key, ()):
        d = distance(family, source.family)
        if d <= max_distance:
            penalty = 0.0 if source.family.blocks == family.blocks else EPILOGUE_PENALTY
            near.append((d + penalty, source.workload, d, source))
    near = sorted(near, key=lambda item: item[:2])[:count]
    best = max((s.gflops for *_, s in near), default=0.0)
    ranked = [(score + (math.log(best / s.gflops) if 0 < s.gflops < best else 0.0), name, d, s)
              for score, name, d, s in near]
    ranked.sort(key=lambda item: item[:2])
    return [(d, source) for _, _, d, source in ranked]


def _flops(mod: tvm.IRModule) -> float:
    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - no arithmetic to count: throughput is not compared
        return 0.0


