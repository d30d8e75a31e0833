"""An embedded SQLite store of exact latency measurements.

Keyed by (device, precision, input shape, structural hash) plus the measurement context (target,
threads, tuning state), so a candidate is never measured twice, across processes and runs. WAL
mode and short transactions let several processes write at once without losing rows.

A store is a cache: nothing in it may stop omnic from working or make it answer wrongly.

- A file that is not an SQLite database, or holds another program's ``measurements`` table, is
  moved aside to ``<name>.corrupt-<time>`` (with its ``-wal``/``-shm``), kept for the user, and an
  empty store takes its place; one :class:`~omnic.core.errors.CacheWarning` names both files.
- A store that cannot be written (read-only file, folder or mount) still answers lookups; writes
  are turned off with one warning. Where there is no store and none can be created, it is empty.
- A row whose values cannot be a measurement (negative or non-finite latency, results that are
  not a JSON list of times, wrong types) is treated as missing, so the oracle measures it again.

Warnings go through :mod:`warnings` (category ``CacheWarning``), so they show once in a script
and tests can assert them; an ignored row is logged on the ``omnic.oracle.store`` logger.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from omnic.core.errors import CacheError, CacheWarning, describe
from omnic.core.measure import Measurement

_SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    device TEXT NOT NULL,
    precision TEXT NOT NULL,
    input_shape TEXT NOT NULL,
    structural_hash TEXT NOT NULL,
    context TEXT NOT NULL,
    median_ms REAL,
    spread REAL,
    runs INTEGER,
    results_ms TEXT,
    error TEXT,
    extra TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (device, precision, input_shape, structural_hash, context)
);
"""
#: The table's columns in order (``put`` inserts positionally, so the order is part of the schema).
_COLUMNS = ("device", "precision", "input_shape", "structural_hash", "context", "median_ms", "spread",
            "runs", "results_ms", "error", "extra", "created")
#: SQLite error names (prefixes) of a file that is not, or no longer, a database.
_CORRUPT = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
#: ... and of a store this process may read but not write (file, folder or mount read-only).
_NO_WRITE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")
_MEMORY = ":memory:"
_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class _BadStore(Exception):
    """The file opened as a database but is not our store (another schema)."""


def _is(exc: BaseException, names: tuple[str, ...]) -> bool:
    return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorname", "") or "").startswith(names)


def _finite(value: Any, *, low: float, strict: bool = False) -> bool:
    """A real number (not a bool, not text that SQLite kept as text), finite, above ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low


def _measurement(row: tuple, device: str) -> Measurement | None:
    """The Measurement a stored row describes, or None when its values cannot be one (tampered,
    or written by something else): such a row is missing, not an answer."""
    median, spread, runs, results, error = row
    if median is not None and not _finite(median, low=0.0, strict=True):
        return None
    if (error is not None and not isinstance(error, str)) or (median is None and error is None):
        return None  # a row must hold a latency or the reason there is none
    if spread is not None and not _finite(spread, low=0.0):
        return None
    if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool) or runs < 0):
        return None
    try:
        values = json.loads(results) if results is not None else []
    except (TypeError, ValueError):
        return None
    if not isinstance(values, list) or not all(_finite(v, low=0.0) for v in values):
        return None
    return Measurement(median_ms=None if median is None else float(median), spread=float(spread or 0.0),
                       runs=runs or 0, results_ms=tuple(float(v) for v in values), error=error,
                       device=device, cached=True)


@dataclass(frozen=True, kw_only=True)
class StoreKey:
    """What identifies a measurement."""

    device: str
    precision: str
    input_shape: str
    structural_hash: str
    context: str = ""

    @staticmethod
    def shape_text(shapes: Any) -> str:
        return json.dumps([list(s) for s in shapes])


def _checked(extra: str | None) -> bool | None:
    """The ``checked`` flag of a row's extra JSON (None for rows stored before the output check)."""
    try:
        value = json.loads(extra or "{}").get("checked")
    except (ValueError, AttributeError):  # not JSON, or not an object: unknown, not an error
        return None
    return value if isinstance(value, bool) else None


class LatencyStore:
    """SQLite-backed measurement store (one file, safe for concurrent writer processes).

    Args:
        path: The database file (created with its folder when missing).

    Attributes:
        read_only: True when writes are off (the file or its folder cannot be written); lookups
            still answer from what is stored.

    Raises:
        CacheError: The store's folder cannot be created, or the file stays locked or unreadable
            for reasons other than corruption or missing write permission.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.read_only = False
        self._local = threading.local()
        self._lock = threading.RLock()  # one repair at a time (a repair may reopen)
        self._generation = 0  # bumped when the file is replaced: every thread then reconnects
        self._target: tuple[str, bool] = (str(self.path), False)  # (what sqlite3 opens, as URI)
        self._inode: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the folder of the latency store {self.path}: {describe(exc)}; "
                             "set OMNIC_CACHE_DIR to a writable directory") from exc
        self._open()

    # --- opening and repairing ------------------------------------------------------------------

    def _open(self) -> None:
        if not self._writable():  # a non-root user without permission: known before sqlite fails
            self._open_read_only("no write permission")
            return
        inode = _inode(self.path)
        try:
            self._open_writable()
        except (_BadStore, sqlite3.DatabaseError) as exc:
            if _is(exc, _NO_WRITE):  # e.g. root on a read-only mount: only sqlite finds out
                self._open_read_only(describe(exc))
            elif isinstance(exc, _BadStore) or _is(exc, _CORRUPT):
                self._move_aside(describe(exc), inode)
            else:
                raise CacheError(f"cannot open the latency store {self.path}: {describe(exc)}; if another "
                                 "process holds it, try again when it is done") from exc

    def _writable(self) -> bool:
        folder_ok = os.access(self.path.parent, os.W_OK)  # WAL creates -wal/-shm files beside it
        return folder_ok and (not self.path.exists() or os.access(self.path, os.W_OK))

    def _probe(self, target: str, uri: bool) -> tuple[sqlite3.Connection, bool]:
        """A connection to ``target`` and whether it holds our table; raises _BadStore for another
        schema. Reads only, so a file moved aside is byte for byte what the user had."""
        conn = sqlite3.connect(target, uri=uri, timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=60000")
            names = tuple(r[1] for r in conn.execute("PRAGMA table_info(measurements)"))
            if names and names != _COLUMNS:
                raise _BadStore(f"its measurements table has the columns {', '.join(names)}")
            return conn, bool(names)
        except BaseException:
            conn.close()
            raise

    def _open_writable(self) -> None:
        with contextlib.suppress(OSError):
            with self.path.open("rb") as f:
                header = f.read(len(_HEADER))
            # checked before sqlite sees the file: on close it may delete a -wal it cannot make
            # sense of, and the user's files are to be kept as they were
            if header and header != _HEADER:
                raise _BadStore("it is not an SQLite file")
        conn, _ = self._probe(str(self.path), uri=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._inode = _inode(self.path)  # which file this is: a repair elsewhere replaces it
        self._adopt(conn, (str(self.path), False))

    def _open_read_only(self, reason: str) -> None:
        self.read_only = True
        if self.path.exists():
            quoted = urllib.parse.quote(str(self.path.resolve()))
            # mode=ro reads a WAL store while a writer elsewhere keeps its -shm file; in a read-only
            # folder without one, only immutable=1 opens it (nobody can be writing there anyway)
            for target in (f"file:{quoted}?mode=ro", f"file:{quoted}?mode=ro&immutable=1"):
                try:
                    conn, has_table = self._probe(target, uri=True)
                except (_BadStore, sqlite3.DatabaseError) as exc:
                    if _is(exc, _NO_WRITE):
                        continue
                    reason = f"{reason}, and it cannot be read: {describe(exc)}"
                    break  # corrupt, and not ours to move aside: start empty
                if has_table:
                    self._adopt(conn, (target, True))
                    self._warn(f"the latency store {self.path} is read-only ({reason}): stored latencies "
                               "are served, but writes are off and new measurements are not kept. To keep "
                               f"them, make {self.path} and its folder writable or set OMNIC_CACHE_DIR to a "
                               "writable directory.")
                    return
                conn.close()
                break
        self._adopt(None, (_MEMORY, False))
        self._warn(f"no usable latency store at {self.path} ({reason}): nothing is stored and writes are "
                   f"off, so every latency is measured. Make {self.path.parent} writable or set "
                   "OMNIC_CACHE_DIR to a writable directory.")

    def _move_aside(self, reason: str, inode: int | None) -> None:
        """Keep the broken file (``inode``, and its -wal/-shm) for the user under a new name, and
        start empty."""
        with self._lock:
            if _inode(self.path) != inode:
                self._open()  # another thread or process already replaced it
                return
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while aside.exists():
                n += 1
                aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            try:
                os.replace(self.path, aside)
                for suffix in ("-wal", "-shm"):
                    side = self.path.with_name(self.path.name + suffix)
                    if side.exists():
                        os.replace(side, aside.with_name(aside.name + suffix))
            except FileNotFoundError:
                pass  # moved by another process between the check and here: open what is there now
            except OSError as exc:
                self._open_read_only(f"it is not a latency store ({reason}) and cannot be moved aside: "
                                     f"{describe(exc)}")
                return
            else:
                self._warn(f"{self.path} is not a usable latency store ({reason}); moved it to {aside} "
                           f"(kept for you to inspect or delete) and started an empty store at {self.path}. "
                           "Latencies stored there will be measured again.")
            self._open()  # a fresh file now (or, if the folder turned read-only meanwhile, read-only)

    def _adopt(self, conn: sqlite3.Connection | None, target: tuple[str, bool]) -> None:
        old = getattr(self._local, "conn", None)
        if old is not None and old is not conn:
            old.close()
        self._target = target
        self._generation += 1
        self._local.conn, self._local.generation = conn, self._generation
        if conn is None:
            self._connect()

    def _warn(self, message: str) -> None:
        warnings.warn(message, CacheWarning, stacklevel=4)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", None) == self._generation:
            return conn
        if conn is not None:
            conn.close()
        target, uri = self._target
        conn = sqlite3.connect(target, uri=uri, timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        if target == _MEMORY:
            conn.execute(_SCHEMA)  # a store of this thread's own that keeps nothing (writes are off)
        self._local.conn, self._local.generation = conn, self._generation
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(connection)``; a file found corrupt meanwhile is moved aside and ``fn`` runs again."""
        try:
            return fn(self._connect())
        except sqlite3.DatabaseError as exc:
            if not _is(exc, _CORRUPT):
                raise
            if self.read_only:
                self._open_read_only(describe(exc))
            else:
                self._move_aside(describe(exc), self._inode)
        return fn(self._connect())

    # --- the store ------------------------------------------------------------------------------

    def get(self, key: StoreKey) -> Measurement | None:
        """The stored measurement of ``key``, or None (never stored, or a row that is not valid)."""
        row = self._call(lambda conn: conn.execute(
            "SELECT median_ms, spread, runs, results_ms, error, extra FROM measurements WHERE device=? AND "
            "precision=? AND input_shape=? AND structural_hash=? AND context=?",
            (key.device, key.precision, key.input_shape, key.structural_hash, key.context)).fetchone())
        if row is None:
            return None
        measurement = _measurement(row[:5], key.device)
        if measurement is not None:
            measurement = dataclasses.replace(measurement, **_quality(row[5]), checked=_checked(row[5]))
        if measurement is None:
            _log.warning("ignoring an invalid row of %s for %s (median_ms=%r, results_ms=%.60r): it will be "
                         "measured again", self.path, key, row[0], row[3])
        return measurement

    def put(self, key: StoreKey, m: Measurement, extra: dict[str, Any] | None = None) -> None:
        """Store ``m`` under ``key`` (replacing what was there); nothing happens when writes are off."""
        if self.read_only:
            return
        # The measurement's load, noise flag and attempts ride in `extra`: the key and the columns
        # stay as they were, so stores written before keep answering.
        values = (key.device, key.precision, key.input_shape, key.structural_hash, key.context,
                  m.median_ms, m.spread, m.runs, json.dumps(list(m.results_ms)), m.error,
                  json.dumps({**m.quality(), **(extra or {})}), time.time())
        for attempt in range(20):
            try:
                self._call(lambda conn: conn.execute(
                    "INSERT OR REPLACE INTO measurements VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", values))
                return
            except sqlite3.OperationalError as exc:
                if _is(exc, _NO_WRITE):  # made read-only while open (or root on a read-only mount)
                    self.read_only = True
                    self._warn(f"the latency store {self.path} cannot be written ({describe(exc)}): stored "
                               "latencies are served, but writes are off and new measurements are not kept. "
                               "Make it writable or set OMNIC_CACHE_DIR to a writable directory.")
                    return
                if "locked" not in str(exc):
                    raise CacheError(f"cannot write the latency store {self.path}: {describe(exc)}") from exc
                if attempt == 19:
                    raise CacheError(f"the latency store {self.path} stayed locked by another process: "
                                     f"{describe(exc)}; try again when it is done") from exc
                time.sleep(0.05 * (attempt + 1))  # "database is locked" beyond busy_timeout

    def __len__(self) -> int:
        return int(self._call(lambda conn: conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]))

    def rows(self, device: str | None = None) -> Iterator[dict[str, Any]]:
        """Every stored row as a dict of its columns, as stored (not validated)."""
        query = "SELECT * FROM measurements" + (" WHERE device=?" if device else "")
        cur = self._call(lambda conn: conn.execute(query, (device,) if device else ()))
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row))

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _quality(extra_text: str | None) -> dict[str, Any]:
    """``load``/``noisy``/``attempts`` from a row's ``extra`` (rows written before carry none)."""
    try:
        extra = json.loads(extra_text or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(extra, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(extra.get("load"), (int, float)) and not isinstance(extra.get("load"), bool):
        out["load"] = float(extra["load"])
    if isinstance(extra.get("noisy"), bool):
        out["noisy"] = extra["noisy"]
    if isinstance(extra.get("attempts"), int) and not isinstance(extra.get("attempts"), bool):
        out["attempts"] = extra["attempts"]
    return out


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
