"""MetaSchedule rules omnic adds for CPU targets, one rule per module (like TVM's dlight):

- :mod:`~omnic.compile.rules.pool`: pooling blocks, which TOPI annotates but TVM schedules only
  with the generic rules on CPUs;
- :mod:`~omnic.compile.rules.winograd_transform`: the transforms of :mod:`omnic.compile.winograd`;
- :mod:`~omnic.compile.rules.depthwise`: NHWC depthwise convs with their epilogue fused.

A rule is a global function ``s_tir.meta_schedule.<target key>.<schedule_rule>`` that
MetaSchedule's ``ApplyCustomRule`` calls for each block carrying that ``schedule_rule``
annotation; it returns the block's design space, which the tuner measures like any other.
:func:`register` installs them before tuning; :func:`space_revision` tells the tuning ledger
which tasks they schedule. The names they are keyed by live in
:mod:`~omnic.compile.rules.marking`, which imports no other part of omnic's compiler.
"""
from __future__ import annotations

import tvm_ffi

from omnic.compile.rules import depthwise, pool, winograd_transform
from omnic.compile.rules.depthwise import DEPTHWISE_WIDTH_TILES, tag_depthwise_kernels
from omnic.compile.rules.marking import (DEPTHWISE_RULE, OWN_RULES, POOL_RULES, SPACE_REVISION, TARGET_KEYS,
                                         WINOGRAD_RULES, mark_own_task, space_revision)
from omnic.compile.rules.pool import MAX_UNROLLED_WINDOW

__all__ = ["DEPTHWISE_RULE", "DEPTHWISE_WIDTH_TILES", "MAX_UNROLLED_WINDOW", "OWN_RULES", "POOL_RULES",
           "SPACE_REVISION", "TARGET_KEYS", "WINOGRAD_RULES", "mark_own_task", "register", "space_revision",
           "tag_depthwise_kernels"]

#: every rule omnic registers: ``schedule_rule`` value -> rule function
RULES = {**pool.RULES, **winograd_transform.RULES, **depthwise.RULES}

_registered = False


def register() -> None:
    """Register omnic's rules for CPU targets (idempotent). Called before tuning."""
    global _registered
    if _registered:
        return
    for key in TARGET_KEYS:
        for rule, schedule in RULES.items():
            tvm_ffi.register_global_func(f"s_tir.meta_schedule.{key}.{rule}", schedule, override=True)
    _registered = True
