"""omnic's MetaSchedule rule for CPU pooling: every variant of its design space computes the pool,
the space holds a vectorized schedule without an rfactor buffer, and tuning databases tuned before
the rule reopen their pooling tasks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from omnic import Deployment, engine, schedule_rules, tuning
from tests.test_tuning import FAST

CPU = {"kind": "llvm", "num-cores": 2}


def _pool_module(op, shape):
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape, "float32"))
    with bb.function("main", [x]):
        y = bb.emit(op(x))
        bb.emit_func_output(y)
    mod = relax.transform.LegalizeOps()(bb.get())
    gv = next(g for g in mod.get_global_vars() if g.name_hint != "main")
    return tvm.IRModule({"main": mod[gv].with_attr("global_symbol", "main")})


def _nhwc(f):
    return lambda t: f(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


POOLS = {
    # name: (relax op, input shape, torch reference on the NHWC/NCHW input)
    "max 3x3/2 NHWC": (lambda r: lambda x: r.op.nn.max_pool2d(x, pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1),
                                                               layout="NHWC"),
                       (1, 13, 13, 32), _nhwc(lambda t: nn.functional.max_pool2d(t, 3, 2, 1))),
    "avg 3x3/2 NHWC": (lambda r: lambda x: r.op.nn.avg_pool2d(x, pool_size=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1),
                                                               layout="NHWC"),
                       (1, 9, 9, 24), _nhwc(lambda t: nn.functional.avg_pool2d(t, 3, 2, 1, count_include_pad=False))),
    "global avg NHWC": (lambda r: lambda x: r.op.nn.adaptive_avg_pool2d(x, output_size=(1, 1), layout="NHWC"),
                        (1, 7, 7, 48), _nhwc(lambda t: nn.functional.adaptive_avg_pool2d(t, 1))),
    "max 2x2/2 NCHW": (lambda r: lambda x: r.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2)),
                       (1, 8, 10, 16), lambda t: nn.functional.max_pool2d(t, 2, 2)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_every_variant_of_the_pool_design_space_computes_the_pool(name):
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    schedule_rules.register()
    make_op, shape, reference = POOLS[name]
    mod = _pool_module(make_op(relax), shape)
    target = tvm.target.Target(CPU)
    assert schedule_rules.space_revision(mod, target) == schedule_rules.SPACE_REVISION
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", search_strategy="evolutionary")
    spaces = ctx.generate_design_space()
    assert len(spaces) >= 2  # omnic's variants and the generic fallback

    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    expected = reference(torch.from_numpy(x)).numpy()
    vectorized_without_rfactor = 0
    for space in spaces:
        sch = space.copy()
        assert all(pp.apply(sch) for pp in ctx.space_generator.postprocs)
        text = sch.mod.script()
        vectorized_without_rfactor += "T.vectorized" in text and "_rf" not in text
        lib = tvm.compile(sch.mod, target)
        dev = tvm.cpu(0)
        out = tvm.runtime.tensor(np.zeros(expected.shape, "float32"), dev)
        lib["main"](tvm.runtime.tensor(x, dev), out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert vectorized_without_rfactor >= 1


def test_space_revision_is_for_cpu_pools_only():
    import tvm
    from tvm import relax

    pool = _pool_module(lambda x: relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2)), (1, 4, 8, 8))
    relu = _pool_module(lambda x: relax.op.nn.relu(x), (1, 4, 8, 8))
    assert schedule_rules.space_revision(pool, tvm.target.Target(CPU)) == schedule_rules.SPACE_REVISION
    assert schedule_rules.space_revision(relu, tvm.target.Target(CPU)) == 0
    assert schedule_rules.space_revision(pool, tvm.target.Target("nvidia/nvidia-a100")) == 0


class PoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))).mean((2, 3))


def test_pool_tasks_tuned_before_the_rule_are_reopened(fresh_cache):
    torch.manual_seed(0)
    model, x = PoolNet().eval(), torch.randn(1, 3, 32, 32)

    def compile_(trials):
        with tuning.using(FAST):
            return engine.compile(model, Deployment(device="host", tuning_trials=trials), x, progress=False)

    first = compile_(16)  # 4 tasks (conv, pool, mean, input transpose): a batch each
    rep = first.report["tuning"]
    assert first.report["max_rel_error"] <= 1e-4
    pool_task = next(t for t in rep["per_task"] if t["name"].startswith("max_pool2d"))
    assert pool_task["trials_run"] > 0
    ledger_file = Path(rep["database"]) / tuning.LEDGER
    ledger = json.loads(ledger_file.read_text())
    spaces = {e["name"]: e.get("space", 0) for e in ledger["tasks"].values()}
    assert spaces[pool_task["name"]] == schedule_rules.SPACE_REVISION
    assert all(v == 0 for k, v in spaces.items() if k != pool_task["name"])

    # as if tuned by an omnic without the rule, every task finished
    for entry in ledger["tasks"].values():
        entry.pop("space", None)
        entry["complete"] = True
    ledger_file.write_text(json.dumps(ledger))
    reopened = compile_(16)
    assert reopened.report["max_rel_error"] <= 1e-4  # built with the rule's pool schedule
    again = reopened.report["tuning"]
    assert again["new_tasks"] == 1 and again["tasks_in_database"] == again["tasks"] - 1
    assert [t["name"] for t in again["per_task"] if t["trials_run"]] == [pool_task["name"]]
    assert compile_(16).report["tuning"]["trials"] == 0  # reopened once, then done


def test_an_unfinished_pool_task_resumes_instead_of_reopening(fresh_cache):
    """The rule's space revision reaches the ledger with the first batch, not only when the task
    finishes: a run stopped by its time budget leaves a partial pool task that the next run
    resumes (its trials counted), rather than one it takes for tuned before the rule."""
    model, x = nn.MaxPool2d(3, 2, 1).eval(), torch.randn(1, 16, 32, 32)

    def compile_(**budget):
        with tuning.using(FAST):
            return engine.compile(model, Deployment(device="host", **budget), x, progress=False)

    stopped = compile_(tuning_trials=16, tuning_time_s=0.01)  # the pool (heaviest) gets one batch
    rep = stopped.report["tuning"]
    assert rep["stopped_by_time"] is True and stopped.report["max_rel_error"] <= 1e-4
    ledger = json.loads((Path(rep["database"]) / tuning.LEDGER).read_text())["tasks"]
    pool = next(e for e in ledger.values() if e["name"].startswith("max_pool2d"))
    assert pool["complete"] is False and pool["trials"] > 0
    assert pool["space"] == schedule_rules.SPACE_REVISION

    resumed = compile_(tuning_trials=16)
    assert resumed.report["tuning"]["resumed_tasks"] == 1
    assert resumed.report["max_rel_error"] <= 1e-4
