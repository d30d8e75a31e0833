"""The tuning ledger: which workloads of a database got how many trials, and which are finished.

``JSONDatabase`` records candidates, not runs: after a kill it cannot say whether a workload's
tuning ended or was cut short. The ledger (``omnic_tasks.json`` next to the database, written
after every batch) can. A leaf module (no TVM): the Winograd rewrite reads the ledger to learn
whether a database holds tuned Winograd kernels without loading the tuner.

The file name, the version and the entry fields are read back by later runs: changing them
orphans every database tuned so far.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LEDGER = "omnic_tasks.json"
LEDGER_VERSION = 2  # 2: tasks are keyed by their anchor op (MODULE_EQUALITY)


def read_ledger(path: Path) -> dict[str, Any]:
    """The ledger at ``path``; an empty one if it is missing, unreadable or of another version."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") == LEDGER_VERSION:
            return data
    except (OSError, ValueError):
        pass
    return {"version": LEDGER_VERSION, "tasks": {}}


def write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    """Write ``ledger`` to ``path`` atomically."""
    # write-then-rename: a kill leaves the old or the new ledger, never half of one
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, path)
