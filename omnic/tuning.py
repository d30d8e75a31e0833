"""MetaSchedule tuning with a persistent per-device database (filled in by the tuning issue)."""
from __future__ import annotations

from typing import Any

from omnic.cache import cache_root
from omnic.deployment import Deployment


def database_dir(deployment: Deployment, target: Any) -> Any:
    import re

    from tvm_ffi import structural_hash  # noqa: F401  (keeps the import cost in one place)

    kind = str(target.kind.name)
    mcpu = str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{deployment.device}-{kind}-{mcpu}-{deployment.precision}")
    path = cache_root() / "tuning" / tag
    return path


def database_for(prepared: Any, deployment: Deployment, target: Any, *, progress: bool = True
                 ) -> tuple[Any, dict[str, Any]]:
    """The device's persistent database, if it exists, and a report of tuning done (none yet)."""
    path = database_dir(deployment, target)
    report = {"trials": 0, "tasks": 0, "new_tasks": 0, "database": str(path)}
    if not (path / "database_workload.json").exists():
        return None, report
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(path), allow_missing=False), report
