"""What a compile's tuning step did: :class:`TuningReport`."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

# When a field is a key of the report (its dict form and ``in``): "always"; "run" while the
# report is a tuning run's (it has ``per_task``); "set" while it is not None.
_RUN = {"key": "run"}
_SET = {"key": "set"}


@dataclass(frozen=True, kw_only=True, eq=False)
class TuningReport(Mapping[str, Any]):
    """What :func:`omnic.compile.tuning.database_for` / :func:`~omnic.compile.tuning.tune` did.

    Reads like the dict it replaces (``report["trials"]``, ``report.get("wall_s")``,
    ``"skipped" in report``, ``dict(report)``), with the same keys: a report of a run that
    extracted tasks has every field; one that only applied (or skipped) the database has
    ``database``, ``tasks``, ``new_tasks`` and ``trials`` (and ``skipped`` when it was skipped).
    :meth:`to_dict` is the JSON form stored in the compile report.

    Attributes:
        database: The database folder.
        tasks: Tasks extracted from the module (0 when nothing was extracted).
        tasks_in_database: Tasks the database already held (finished).
        new_tasks: Tasks that still needed trials.
        resumed_tasks: Unfinished tasks of an interrupted run that this run tuned on.
        skipped_tasks: Names of the tasks not worth a trial (``TuningConfig.skip_prefixes``).
        budget: ``{"trials": ..., "time_s": ...}`` this run was given.
        tasks_tuned: Tasks that got trials in this run.
        tasks_completed: Tasks whose tuning is finished.
        trials: Trials run.
        stopped_by_time: Whether the time budget ended the run.
        wall_s: Seconds the run took.
        estimated_model_ms: The model's kernel time as far as its tasks have been measured.
        per_task: One row per task (name, weight, flops, status, trials, batches, best_ms, history).
        builder: The builder that built the candidates (when some were built).
        skipped: Why tuning was skipped (a device that cannot be measured from here).
    """

    database: str
    tasks: int = 0
    tasks_in_database: int | None = field(default=None, metadata=_RUN)
    new_tasks: int = 0
    resumed_tasks: int | None = field(default=None, metadata=_RUN)
    skipped_tasks: list[str] | None = field(default=None, metadata=_RUN)
    budget: dict[str, Any] | None = field(default=None, metadata=_RUN)
    tasks_tuned: int | None = field(default=None, metadata=_RUN)
    tasks_completed: int | None = field(default=None, metadata=_RUN)
    trials: int = 0
    stopped_by_time: bool | None = field(default=None, metadata=_RUN)
    wall_s: float | None = field(default=None, metadata=_RUN)
    estimated_model_ms: float | None = field(default=None, metadata=_RUN)
    per_task: list[dict[str, Any]] | None = field(default=None, metadata=_RUN)
    builder: str | None = field(default=None, metadata=_SET)
    skipped: str | None = field(default=None, metadata=_SET)

    def _keys(self) -> list[str]:
        keys = []
        for f in dataclasses.fields(self):
            when = f.metadata.get("key", "always")
            if (when == "always" or (when == "run" and self.per_task is not None)
                    or (when == "set" and getattr(self, f.name) is not None)):
                keys.append(f.name)
        return keys

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to_dict(self) -> dict[str, Any]:
        """The report as a plain dict (JSON-ready: strings, numbers, lists and dicts)."""
        return {key: getattr(self, key) for key in self._keys()}
