"""Transferred or default: how a kernel's transferred schedule is weighed against the schedule
the default rules give it."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import tvm
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
#: single runs per timing, each after the kernel's weights and output are evicted from the caches
COLD_RUNS = 5


def policy(choice: str, *, target: tvm.target.Target, local: bool, default_rules: Sequence[Any] = ()
           ) -> dict[str, Any] | None:
    """The :func:`transfer_schedules` arguments (``max_distance``, ``accept``) of a choice, or
    None when the build should transfer nothing.

    Args:
        choice: One of :data:`CHOICES`.
        target: The build's target.
        local: Whether kernels can be timed here (the target is this machine's CPU).
        default_rules: The default rules the ``"measure"`` choice compares against.

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
        return {"max_distance": math.inf, "accept": functools.partial(faster_than_default, target=target,
                                                                       default_rules=tuple(default_rules))}
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
