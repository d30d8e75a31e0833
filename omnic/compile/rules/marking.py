"""Names that tie omnic's schedule rules to the blocks they schedule and to the tuning ledger.

A leaf module: the rules, the Winograd rewrite (which annotates its transform blocks) and the
tuner all read these constants, so none of them has to import another to learn a name.

Every string here is stored in tuning databases and ledgers (as ``schedule_rule`` annotations,
task keys and ``space`` revisions); changing one orphans the records tuned under it.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir.schedule import SBlockRV

#: target keys the rules are registered for (every LLVM CPU target carries "cpu")
TARGET_KEYS = ("cpu",)
#: the ``schedule_rule`` values TOPI puts on pooling blocks
POOL_RULES = ("meta_schedule.pool_max", "meta_schedule.pool_avg",
              "meta_schedule.adaptive_pool_avg", "meta_schedule.adaptive_pool_max")
#: ``schedule_rule`` annotations of the Winograd transform blocks (omnic.compile.winograd)
DATA_TRANSFORM_RULE = "omnic.winograd_data_transform"
INVERSE_TRANSFORM_RULE = "omnic.winograd_inverse_transform"
WINOGRAD_RULES = (DATA_TRANSFORM_RULE, INVERSE_TRANSFORM_RULE)
#: the ``schedule_rule`` value the depthwise rule's tagging puts on NHWC depthwise conv blocks
DEPTHWISE_RULE = "omnic.depthwise_nhwc"
#: every ``schedule_rule`` value omnic's rules handle (their tasks carry :data:`SPACE_REVISION`)
OWN_RULES = POOL_RULES + WINOGRAD_RULES + (DEPTHWISE_RULE,)
#: bumped when the design space of a task these rules schedule changes; the tuning ledger
#: reopens such tasks tuned under an older revision (see :func:`space_revision`)
SPACE_REVISION = 1
#: annotation keys that make a fused kernel its own tuning task (see :func:`mark_own_task`)
WINOGRAD_KERNEL_KEY = "omnic.winograd_kernel"
DEPTHWISE_KERNEL_KEY = "omnic.depthwise_kernel"


def space_revision(mod: tvm.IRModule, target: tvm.target.Target) -> int:
    """:data:`SPACE_REVISION` if a block of ``mod`` is scheduled by omnic's rules on ``target``, else 0."""
    if not set(TARGET_KEYS) & {str(k) for k in target.keys}:
        return 0
    for _, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            sch = s_tir.Schedule(func)
            pending = list(sch.get_child_blocks(sch.get_sblock("root")))
        except Exception:  # noqa: BLE001 - no root block: nothing these rules schedule
            continue
        while pending:
            block = pending.pop()
            if str(sch.get(block).annotations.get("schedule_rule", "")) in OWN_RULES:
                return SPACE_REVISION
            pending += list(sch.get_child_blocks(block))
    return 0


def mark_own_task(mod: tvm.IRModule, gv: tvm.ir.GlobalVar, func: tvm.tirx.PrimFunc, sch: s_tir.Schedule,
                  anchor: SBlockRV, key: str) -> None:
    """Annotate ``anchor`` (a block of ``sch``, a schedule of ``func``) with the structural hash of
    the whole kernel under ``key`` and put the result in ``mod`` at ``gv``.

    omnic's tuning database keys workloads by their anchor block, so kernels that differ only in
    their fused epilogue share one task and the tuned trace is replayed onto the others. Where a
    schedule places the epilogue itself, that replay fails; the hash makes each distinct kernel
    its own task, and the same kernel in another model still finds its record.
    """
    sch.annotate(anchor, key, f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}")
    tagged = sch.mod["main"]
    if func.attrs is None or "global_symbol" not in func.attrs:
        tagged = tagged.without_attr("global_symbol")
    mod.update_func(gv, tagged)
