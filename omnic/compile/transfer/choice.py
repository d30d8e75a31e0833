"""Transferred or default: how a kernel's transferred schedule is weighed against the schedule
the default rules give it."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import tvm
from tvm.s_tir import meta_schedule as ms


#: how a kernel's transferred schedule is weighed against the schedule the default rules give it:
#: ``"transferred"`` keeps every transferred schedule that replays; ``"guard"`` only those
#: transferred from a workload within :data:`GUARD_DISTANCE`; ``"measure"`` times both kernels on
#: this machine at build time and keeps the faster (local CPU builds; elsewhere as
#: ``"transferred"``)
CHOICES = ("transferred", "guard", "measure")
# Measured against the plain loop nests (the default before default rules exist) and against
# each kernel tuned on its own with the same budget, transferred kernels never lost to the loop
# nests and were on par with their own tuning, with the distance to the source no predictor of
# the few that lost: keep them all. Revisit with the default rules in place ("measure" tells).
CHOICE = "transferred"
#: the ``"guard"`` choice's largest :func:`distance` (``log 4``: a quarter or four times one
#: extent, or a half of two)
GUARD_DISTANCE = math.log(4.0)


def policy(choice: str, *, target: tvm.target.Target, local: bool, default_rules: Sequence[Any] = ()
           ) -> dict[str, Any]:
    """The :func:`transfer_schedules` arguments (``max_distance``, ``accept``) of a choice.

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
    if choice == "measure" and local:
        return {"max_distance": math.inf, "accept": functools.partial(faster_than_default, target=target,
                                                                       default_rules=tuple(default_rules))}
    return {"max_distance": math.inf, "accept": None}


def faster_than_default(gv: tvm.ir.GlobalVar, original: tvm.tirx.PrimFunc, transferred: tvm.tirx.PrimFunc, *,
                        target: tvm.target.Target, default_rules: Sequence[Any]) -> bool:
    """Whether ``transferred`` runs faster here than the default rules' schedule of ``original``
    (the plain loop nest when no rule takes it). A kernel that cannot be timed keeps the transfer."""
    from omnic.compile.rules.cpu.apply import apply_default_schedules

    try:
        default_mod, _ = apply_default_schedules(tvm.IRModule({gv: original}), target, default_rules)
        return kernel_ms(transferred, target) < kernel_ms(default_mod[gv], target)
    except Exception:  # noqa: BLE001 - timing is advice; a kernel that does not run here is not judged
        return True


def kernel_ms(func: tvm.tirx.PrimFunc, target: tvm.target.Target, *, repeat: int = 5,
              min_repeat_ms: int = 5) -> float:
    """Median milliseconds of one kernel on this machine's CPU, on random inputs (weights already
    in the layout the kernel asks for, as after the build folds their re-layout)."""
    import numpy as np
    from omnic.compile.tuning.builders import fast_build

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    built = fast_build(mod, target)  # without the weight re-layout block, as MetaSchedule times it
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.uniform(-1, 1, [int(d) for d in info.shape]).astype(str(info.dtype)), dev)
            for info in ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)]
    timer = built.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))
    return float(sorted(timer(*args).results)[repeat // 2]) * 1e3
