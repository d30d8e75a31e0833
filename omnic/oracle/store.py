"""An embedded SQLite store of exact latency measurements.

Keyed by (device, precision, input shape, structural hash) plus the measurement context (target,
threads, tuning state), so a candidate is never measured twice, across processes and runs. WAL
mode and short transactions let several processes write at once without losing rows.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    """SQLite-backed measurement store (one file, safe for concurrent writer processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
            self._local.conn = conn
        return conn

    def get(self, key: StoreKey) -> Measurement | None:
        row = self._connect().execute(
            "SELECT median_ms, spread, runs, results_ms, error, extra FROM measurements WHERE device=? AND "
            "precision=? AND input_shape=? AND structural_hash=? AND context=?",
            (key.device, key.precision, key.input_shape, key.structural_hash, key.context)).fetchone()
        if row is None:
            return None
        return Measurement(median_ms=row[0], spread=row[1] or 0.0, runs=row[2] or 0,
                           results_ms=tuple(json.loads(row[3] or "[]")), error=row[4],
                           device=key.device, cached=True, checked=_checked(row[5]))

    def put(self, key: StoreKey, m: Measurement, extra: dict[str, Any] | None = None) -> None:
        conn = self._connect()
        for attempt in range(20):
            try:
                conn.execute(
                    "INSERT OR REPLACE INTO measurements VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (key.device, key.precision, key.input_shape, key.structural_hash, key.context,
                     m.median_ms, m.spread, m.runs, json.dumps(list(m.results_ms)), m.error,
                     json.dumps(extra or {}), time.time()))
                return
            except sqlite3.OperationalError as exc:  # "database is locked" beyond busy_timeout
                if "locked" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM measurements").fetchone()[0])

    def rows(self, device: str | None = None) -> Iterator[dict[str, Any]]:
        query = "SELECT * FROM measurements" + (" WHERE device=?" if device else "")
        cur = self._connect().execute(query, (device,) if device else ())
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
