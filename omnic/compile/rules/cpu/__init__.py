"""Default CPU schedules: deterministic, rule-based schedules for every kernel class omnic meets,
so that a build is good before any tuning (the CPU counterpart of TVM's GPU ``dlight`` rules).

One rule per module, each a :class:`~omnic.compile.rules.cpu.base.CPURule` that says whether it
applies to a kernel and schedules it. :data:`DEFAULT_RULES` is the order they are tried in: the
specific rules (convolutions, pooling, matmuls, reductions) before the general injective one, and
the fallback (which takes any kernel left) last.
:func:`apply_default_schedules` runs them over a module's unscheduled kernels.
"""
from __future__ import annotations

from omnic.compile.rules.cpu.apply import DefaultOutcome, apply_default_schedules, is_scheduled
from omnic.compile.rules.cpu.base import PROVENANCE_ATTR, CPURule, num_cores, vector_lanes
from omnic.compile.rules.cpu.conv2d import Conv2dNHWC
from omnic.compile.rules.cpu.depthwise import DepthwiseNHWC
from omnic.compile.rules.cpu.fallback import FallbackRule
from omnic.compile.rules.cpu.injective import InjectiveRule
from omnic.compile.rules.cpu.matmul import MatmulRule
from omnic.compile.rules.cpu.pool import Pool
from omnic.compile.rules.cpu.reduction import ReductionRule

#: bumped whenever a rule's schedules change (it is part of every default build's fingerprint)
RULES_REVISION = 3

#: the rules, most specific first
DEFAULT_RULES: tuple[CPURule, ...] = (Conv2dNHWC(), DepthwiseNHWC(), Pool(), MatmulRule(), ReductionRule(),
                                      InjectiveRule(), FallbackRule())

__all__ = ["DEFAULT_RULES", "PROVENANCE_ATTR", "RULES_REVISION", "CPURule", "Conv2dNHWC", "DefaultOutcome",
           "DepthwiseNHWC", "FallbackRule", "InjectiveRule", "MatmulRule", "Pool", "ReductionRule",
           "apply_default_schedules", "is_scheduled", "num_cores", "vector_lanes"]
