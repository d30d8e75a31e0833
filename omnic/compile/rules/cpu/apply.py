"""Give every kernel of a module that has no schedule yet the first default rule's schedule.

Like dlight's ``ApplyDefaultSchedule``, with two differences a build needs: a rule that raises is
skipped (the next rule tries the kernel; a broken rule never fails a build), and the caller learns
which rule scheduled each kernel, which it reports and fingerprints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import tvm

from omnic.compile.rules.cpu.base import PROVENANCE_ATTR, CPURule
from omnic.core.errors import describe

#: length of a quoted rule error in the outcome
ERROR_LIMIT = 200


@dataclass(frozen=True, kw_only=True)
class DefaultOutcome:
    """What the default rules did to one kernel that had no schedule.

    Attributes:
        kernel: The kernel's name in the module.
        rule: The rule that scheduled it, or None when none did (it stays a plain loop nest).
        errors: ``"<rule>: <error>"`` for each rule that applied but raised.
    """

    kernel: str
    rule: str | None
    errors: tuple[str, ...] = ()


def is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    """Whether ``func`` already carries a schedule (tuned, transferred or default)."""
    attrs = func.attrs
    return bool(attrs is not None and attrs.get("tirx.is_scheduled", False))


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target, rules: Sequence[CPURule], *,
                            skip: Mapping[str, frozenset[str]] | None = None
                            ) -> tuple[tvm.IRModule, tuple[DefaultOutcome, ...]]:
    """Schedule each unscheduled PrimFunc of ``mod`` with the first of ``rules`` that applies.

    Args:
        mod: A module whose PrimFuncs are the kernels (scheduled ones are left alone).
        target: The CPU target.
        rules: Tried in order; the first that returns a schedule wins.
        skip: Kernel name -> names of rules not to use on it (their schedule did not compile).

    Returns:
        ``(module, outcomes)``: scheduled kernels carry ``tirx.is_scheduled`` and
        :data:`~omnic.compile.rules.cpu.base.PROVENANCE_ATTR` ``"default:<rule>"``; one outcome per
        kernel that had no schedule, in module order.
    """
    updated: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] = {}
    outcomes: list[DefaultOutcome] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        chosen, errors = None, []
        for rule in rules:
            if skip and rule.name in skip.get(gv.name_hint, ()):
                errors.append(f"{rule.name}: its schedule did not compile")
                continue
            try:
                sch = rule.apply(func, target, False)
                if isinstance(sch, (list, tuple)):
                    sch = sch[0] if sch else None
                if sch is None:
                    continue
                scheduled = sch.mod["main"]
            except Exception as exc:  # noqa: BLE001 - a rule that fails leaves the kernel to the next
                errors.append(f"{rule.name}: {describe(exc, ERROR_LIMIT)}")
                continue
            # keep the kernel's own attributes (symbol, layout-free buffers)
            # (0.27 PrimFuncs take their buffers as params: there is no buffer_map)
            updated[gv] = tvm.tirx.PrimFunc(scheduled.params, scheduled.body, scheduled.ret_type,
                                            attrs=func.attrs).with_attr("tirx.is_scheduled", True
                                                        ).with_attr(PROVENANCE_ATTR, f"default:{rule.name}")
            chosen = rule.name
            break
        outcomes.append(DefaultOutcome(kernel=gv.name_hint, rule=chosen, errors=tuple(errors)))
    if updated:
        mod = mod.clone()
        for gv, func in updated.items():
            mod.update_func(gv, func)
    return mod, tuple(outcomes)
