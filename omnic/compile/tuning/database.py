"""Where a device's tuning database lives, and opening it safely for tuning or for a build.

One ``JSONDatabase`` per device, target (mcpu, num-cores) and precision lives under
``<cache>/tuning/<tag>/``, shared by every model (:data:`MODULE_EQUALITY`). Tuners take turns
through a file lock; builds read a snapshot and never wait. A process killed while appending
leaves a torn last line, which is dropped on open.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Iterator

import tvm
from tvm.s_tir import meta_schedule as ms

from omnic.compile.tuning.ledger import LEDGER
from omnic.core.cache import cache_root
from omnic.core.deployment import Deployment
from omnic.core.errors import TuningError, describe

#: How MetaSchedule tells workloads apart. "anchor-block" keys a fused kernel by its main op (the
#: conv or matmul) and ignores the elementwise epilogue fused after it: a conv that runs as
#: conv+bias, conv+bias+relu and conv+bias+add+relu is three tasks under structural equality
#: that share nothing. Under anchor-block they are one task (its weight the sum), tuned once;
#: the best schedule of the anchor op is replayed onto each epilogue variant at build time
#: (MetaSchedule's ``schedule_using_anchor_trace``).
MODULE_EQUALITY = "anchor-block"
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def run_ms(run_secs) -> float | None:
    """Mean milliseconds of a MetaSchedule measurement's ``run_secs``; None when there is none or
    the candidate failed (MetaSchedule records a failed run as 1e10 s)."""
    secs = [float(getattr(s, "value", s)) for s in (run_secs or [])]
    if not secs or max(secs) >= 1e9:
        return None
    return 1e3 * sum(secs) / len(secs)


def database_dir(deployment: Deployment, target: tvm.target.Target) -> Path:
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


def state_digest(path: Path) -> str:
    """A short digest of what a build takes from the database at ``path``: its records, its
    workloads and its ledger (which decides, for one, whether convs are built as Winograd).

    Builds are deterministic functions of the database's content, and the files are only ever
    appended to or replaced, so their sizes and modification times stand for their content:
    equal digests mean the same kernels get the same schedules. ``"none"`` when there is no
    database. Reading three ``stat``s is cheap enough for every latency-store lookup.
    """
    parts = []
    for name in (WORKLOADS, RECORDS, LEDGER):
        try:
            st = (Path(path) / name).stat()
        except OSError:
            continue
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    if not parts:
        return "none"
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
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


def repair_jsonl(path: Path) -> int:
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


def open_database(path: Path, *, create: bool = True) -> ms.database.JSONDatabase | None:
    """The ``JSONDatabase`` in ``path`` for tuning into (repaired if a killed writer left a torn
    line), or None when it does not exist and ``create`` is False. Call it holding
    :func:`locked`: it may rewrite the files."""
    workloads, records = path / WORKLOADS, path / RECORDS
    if not create and not workloads.exists():
        return None
    path.mkdir(parents=True, exist_ok=True)
    for p in (workloads, records):
        repair_jsonl(p)
    return _load(path, workloads, records, allow_missing=True)


def open_snapshot(path: Path) -> ms.database.JSONDatabase | None:
    """A read-only snapshot of the database in ``path`` for applying at build time, or None.

    Takes no lock, so a compile never waits for another process's tuning run; the files are
    copied minus a line being appended at this instant, and loaded from the copy.
    """
    workloads, records = path / WORKLOADS, path / RECORDS
    if not workloads.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="omnic-db-") as tmp:
        copies = []
        for src in (workloads, records):
            dst = Path(tmp) / src.name
            dst.write_bytes(src.read_bytes() if src.exists() else b"")
            repair_jsonl(dst)
            copies.append(dst)
        # JSONDatabase reads everything at construction and writes only on commit
        return _load(path, *copies, allow_missing=False)


def _load(path: Path, workloads: Path, records: Path, *, allow_missing: bool) -> ms.database.JSONDatabase:
    try:
        return ms.database.JSONDatabase(path_workload=str(workloads), path_tuning_record=str(records),
                                        allow_missing=allow_missing, module_equality=MODULE_EQUALITY)
    except Exception as exc:  # noqa: BLE001 - TVM raises plain errors on unreadable files
        raise TuningError(f"cannot read the tuning database in {path}: {describe(exc)}\n"
                          f"  fix: move the folder away (tuning starts afresh)") from exc
