"""Default CPU schedules: deterministic, rule-based schedules for every kernel class omnic meets,
so that a build is good before any tuning (the CPU counterpart of TVM's GPU ``dlight`` rules).

One rule per module, each a :class:`~omnic.compile.rules.cpu.base.CPURule` that says whether it
applies to a kernel and schedules it. :data:`DEFAULT_RULES` is the order they are tried in: the
specific rules (convolutions, matmuls, pooling, reductions) before the general injective one.
:func:`apply_default_schedules` runs them over a module's unscheduled kernels.
"""
from __future__ import annotations

from omnic.compile.rules.cpu.apply import DefaultOutcome, apply_default_schedules, is_scheduled
from omnic.compile.rules.cpu.base import PROVENANCE_ATTR, CPURule, num_cores, vector_lanes
from omnic.compile.rules.cpu.fallback import FallbackRule
from omnic.compile.rules.cpu.injective import InjectiveRule

#: bumped whenever a rule's schedules change (it is part of every default build's fingerprint)
RULES_REVISION = 1

#: the rules, most specific first; the injective rule and the fallback (which takes any kernel
#: left) stay last
DEFAULT_RULES: tuple[CPURule, ...] = (InjectiveRule(), FallbackRule())

__all__ = ["DEFAULT_RULES", "PROVENANCE_ATTR", "RULES_REVISION", "CPURule", "DefaultOutcome", "FallbackRule",
           "InjectiveRule", "apply_default_schedules", "is_scheduled", "num_cores", "vector_lanes"]
