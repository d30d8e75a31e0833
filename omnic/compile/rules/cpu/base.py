"""The base of omnic's default CPU schedule rules, and what every rule needs to know of its target.

A default rule is a dlight :class:`~tvm.s_tir.dlight.ScheduleRule`: ``apply(func, target,
tunable)`` returns a :class:`~tvm.s_tir.Schedule` of ``func`` when the rule knows the kernel, or
None to let the next rule try. No rule measures anything: a default schedule is a deterministic
function of the kernel's shapes and the target's vector width and core count.
"""
from __future__ import annotations

import tvm
from tvm.s_tir.dlight import ScheduleRule
from tvm.target import codegen

#: attribute a scheduled kernel carries to say where its schedule came from (``"default:<rule>"``,
#: ``"tuned:<record>"``, ``"transferred:<workload>:<record>"``); kernels without it are unscheduled
PROVENANCE_ATTR = "omnic.schedule"


class CPURule(ScheduleRule):
    """A default schedule rule for LLVM CPU targets.

    Subclasses set :attr:`name` (stable: it is part of build fingerprints and reports) and
    implement :meth:`schedule`, which returns None when the kernel is not theirs.
    """

    #: the rule's name in reports and build fingerprints
    name = "cpu"

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target, tunable: bool):  # noqa: ARG002
        if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return self.schedule(func, target)

    def schedule(self, func: tvm.tirx.PrimFunc, target: tvm.target.Target):
        """A schedule of ``func`` for ``target``, or None when this rule does not apply."""
        raise NotImplementedError


def vector_bits(target: tvm.target.Target) -> int:
    """Width in bits of the target's widest usable float SIMD register (AVX-512, AVX2, NEON, SSE)."""
    def has(feature: str) -> bool:
        try:
            return bool(codegen.target_has_features(feature, target))
        except Exception:  # noqa: BLE001 - a target LLVM cannot query (no mcpu/mtriple): assume SSE
            return False

    if has("avx512f"):
        return 512
    if has("avx2") or has("avx"):
        return 256
    return 128  # NEON / ASIMD and SSE2, the baseline of every 64-bit CPU omnic targets


def vector_lanes(target: tvm.target.Target, dtype: str = "float32") -> int:
    """Elements of ``dtype`` per SIMD register of ``target``."""
    return max(1, vector_bits(target) // tvm.runtime.DataType(dtype).bits)


def num_cores(target: tvm.target.Target) -> int:
    """Threads the kernels will run on (the target's ``num-cores``, 1 when unset)."""
    return max(1, int(target.attrs.get("num-cores", 1)))


def accumulate_in_registers(sch, block, epilogue, at):
    """Keep ``block``'s result in a local (register) buffer and write it out at loop ``at``:
    through ``epilogue`` (the fused elementwise block that consumes it) when there is one, else
    through a new write-back block. Returns the block that writes the kernel's output."""
    if epilogue is None:
        epilogue = sch.cache_write(block, 0, "local")
    else:
        sch.set_scope(block, 0, "local")
    sch.reverse_compute_at(epilogue, at)
    return epilogue
