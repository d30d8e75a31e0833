"""A default schedule that does not build never fails the build: its rule gives way to the next.

Found by the differential fuzzer: the reduction rule's schedule of a layer norm over (1, 5, 16)
vectorized a loop holding an allocation, which TVM's lowering refuses ("VectorizeLoop before
LiftStorageAlloc"), and the whole compile failed.
"""
from __future__ import annotations

import torch
from torch import nn

from omnic import engine
from omnic.compile import build
from omnic.compile.rules.cpu import DEFAULT_RULES, CPURule


class _Unbuildable(CPURule):
    """Schedules every kernel into something TVM cannot build: a call to a function that does not exist."""

    name = "unbuildable"

    def schedule(self, func, target):
        from tvm import s_tir, tirx

        sch = s_tir.Schedule(func)
        block = sch.get_child_blocks(sch.get_sblock("root"))[0] if _has_root(sch) else None
        if block is None:
            return None
        sch.annotate(sch.get_loops(block)[0], "pragma_import_llvm", "this is not LLVM IR")
        return sch


def _has_root(sch):
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def test_layer_norm_that_broke_a_rule_builds_and_matches():
    model = nn.LayerNorm(16).eval()
    dm = engine.compile(model, "host", torch.randn(1, 5, 16))  # compile checks against PyTorch
    assert dm.report["schedules"]["unscheduled"] == 0


def test_a_rule_whose_schedule_does_not_build_gives_way_to_the_next():
    from omnic.compile import frontend, pipeline
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), torch.randn(2, 8)
    dep = Deployment.coerce("host")
    target = tvm_target(dep.spec, num_threads=2)
    prepared = pipeline.prepare(frontend.lower(trace(model, x)), dep.spec, target)
    result = build.build_result(prepared, dep.spec, target, None, default_rules=(_Unbuildable(), *DEFAULT_RULES))
    assert result.defaults and all(o.rule not in (None, "unbuildable") for o in result.defaults)
    assert all("unbuildable: its schedule did not compile" in o.errors for o in result.defaults)
    assert result.executable is not None
