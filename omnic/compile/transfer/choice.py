"""Transferred or default: how a kernel's transferred schedule is weighed against the schedule
the default rules give it."""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms


#: how a kernel's transferred schedule is weighed against the schedule the default rules give it:
#: ``"transferred"`` keeps every transferred schedule that replays; ``"guard"`` only those
#: transferred from a workload within :data:`GUARD_DISTANCE`; ``"measure"`` times both kernels on
#: this machine at build time and keeps the faster (local CPU builds; elsewhere the default
#: rules' schedules are kept and nothing is transferred)
CHOICES = ("transferred", "guard", "measure")
# Why "measure". Against plain loop nests, transferred kernels never lost and were on par with
# kernels tuned on their own with the same budget, so "transferred" was the choice while there
# were no default rules. Against the default rules, transferred (and even exactly tuned) records
# of a short tuning run lost on most kernels, a whole network by a wide margin, and neither the
# distance to the source nor anything else known without running the kernels told the few that
# won: only timing tells, at the cost of building each transferred kernel twice.
CHOICE = "measure"
#: the ``"guard"`` choice's largest :func:`distance` (``log 4``: a quarter or four times one
#: extent, or a half of two)
GUARD_DISTANCE = math.log(4.0)
#: interleaved timing rounds of the ``"measure"`` choice (the fastest of each kernel's counts)
MEASURE_ROUNDS = 3
#: side file of the ``"measure"`` choice's decisions, next to the database
DECISIONS = "omnic_transfer_choices.json"
DECISIONS_VERSION = 1
#: single runs per timing, each after the kernel's weights and output are evicted from the caches
COLD_RUNS = 5


def policy(choice: str, *, target: tvm.target.Target, local: bool, default_rules: Sequence[Any] = (),
           memo_dir: Path | None = None) -> dict[str, Any] | None:
    """The :func:`transfer_schedules` arguments (``max_distance``, ``accept``) of a choice, or
    None when the build should transfer nothing.

    Args:
        choice: One of :data:`CHOICES`.
        target: The build's target.
        local: Whether kernels can be timed here (the target is this machine's CPU).
        default_rules: The default rules the ``"measure"`` choice compares against.
        memo_dir: The database's folder, where the ``"measure"`` choice remembers its decisions
            (:data:`DECISIONS`): a later build of the same kernels times nothing and decides
            the same, so a build stays a function of the database's state. None remembers
            nothing.

    Raises:
        ValueError: An unknown choice.
    """
    if choice not in CHOICES:
        raise ValueError(f"unknown transfer choice {choice!r}; one of {', '.join(CHOICES)}")
    if choice == "guard":
        return {"max_distance": GUARD_DISTANCE, "accept": None}
    if choice == "measure":
        if not local:
            return None  # nothing to time on: the default rules' schedules stand
        decide = functools.partial(faster_than_default, target=target, default_rules=tuple(default_rules))
        return {"max_distance": math.inf, "accept": _Remembered(decide, memo_dir)}
    return {"max_distance": math.inf, "accept": None}


def faster_than_default(gv: tvm.ir.GlobalVar, original: tvm.tirx.PrimFunc, transferred: tvm.tirx.PrimFunc, *,
                        target: tvm.target.Target, default_rules: Sequence[Any]) -> bool:
    """Whether ``transferred`` runs faster here than the default rules' schedule of ``original``
    (the plain loop nest when no rule takes it), timed in interleaved rounds. A transferred
    kernel that cannot be timed is not kept; a default one that cannot be, loses."""
    from omnic.compile.rules.cpu.apply import apply_default_schedules

    try:
        ours = kernel_timer(transferred, target)
    except Exception:  # noqa: BLE001 - a transferred kernel that does not build or run is not kept
        return False
    try:
        default_mod, _ = apply_default_schedules(tvm.IRModule({gv: original}), target, default_rules)
        theirs = kernel_timer(default_mod[gv], target)
    except Exception:  # noqa: BLE001 - a default schedule that does not build or run here
        return True
    best_ours = best_theirs = math.inf
    for _ in range(MEASURE_ROUNDS):  # interleaved: load from other processes hits both alike
        best_ours, best_theirs = min(best_ours, ours()), min(best_theirs, theirs())
    return best_ours < best_theirs


def kernel_ms(func: tvm.tirx.PrimFunc, target: tvm.target.Target, *, repeat: int = COLD_RUNS) -> float:
    """Milliseconds of one kernel on this machine's CPU (see :func:`kernel_timer`)."""
    return kernel_timer(func, target, repeat=repeat)()


def kernel_timer(func: tvm.tirx.PrimFunc, target: tvm.target.Target, *, repeat: int = COLD_RUNS
                 ) -> Callable[[], float]:
    """Build one kernel for this machine's CPU and return a function that times it: the fastest
    of ``repeat`` single runs, each after evicting every argument but the first (the activation)
    from the CPU caches, as the kernel meets its weights inside a network and as the tuner
    measures it (hot runs favour schedules that lose in the network). Random inputs, the weights
    already in the layout the kernel asks for, as after the build folds their re-layout. The
    fastest, not the median: on a shared machine other processes only ever add time."""
    import numpy as np

    from omnic.compile.tuning.builders import fast_build

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    built = fast_build(mod, target)  # without the weight re-layout block, as MetaSchedule times it
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.uniform(-1, 1, [int(d) for d in info.shape]).astype(str(info.dtype)), dev)
            for info in ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)]
    timer = built.time_evaluator("main", dev, number=1, repeat=repeat, f_preproc="cache_flush_cpu_non_first_arg")
    return lambda: float(min(timer(*args).results)) * 1e3


class _Remembered:
    """An ``accept`` that asks ``decide`` once per (kernel, transferred schedule) and remembers
    the answer in :data:`DECISIONS` (a broken or missing file only costs the timings again)."""

    def __init__(self, decide: Callable[..., bool], folder: Path | None):
        self.decide, self.path = decide, None if folder is None else Path(folder) / DECISIONS
        self.known: dict[str, bool] = {}
        if self.path is not None:
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == DECISIONS_VERSION and data.get("tvm") == tvm.__version__:
                    self.known = {str(k): bool(v) for k, v in data.get("decisions", {}).items()}
            except (OSError, ValueError, AttributeError, TypeError):
                pass

    def __call__(self, gv: tvm.ir.GlobalVar, original: tvm.tirx.PrimFunc, transferred: tvm.tirx.PrimFunc) -> bool:
        key = f"{tvm_ffi.structural_hash(original) & _MASK:016x}:{tvm_ffi.structural_hash(transferred) & _MASK:016x}"
        if key not in self.known:
            self.known[key] = bool(self.decide(gv, original, transferred))
            self._write()
        return self.known[key]

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps({"version": DECISIONS_VERSION, "tvm": tvm.__version__,
                                       "decisions": self.known}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # write-then-rename: a kill leaves the old file or the new one
        except OSError:
            tmp.unlink(missing_ok=True)


_MASK = 0xFFFFFFFFFFFFFFFF
