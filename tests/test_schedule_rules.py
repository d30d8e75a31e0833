"""omnic's MetaSchedule rules for CPU pooling and NHWC depthwise convs: every variant of their
design spaces computes the op, the spaces hold the schedules they exist for (vectorized without an
rfactor buffer; register tiles with the epilogue fused), tuning databases tuned before the pooling
rule reopen their pooling tasks, and a tuned depthwise kernel comes from the rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from omnic import Deployment, engine
from omnic.compile import rules as schedule_rules
from omnic.compile import tuning
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
    # seeded: the spaces' sampled decisions differ per run, and a postprocessor may reject a rare
    # sample (the tuner drops such a candidate), which made this test fail about once in ten
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", search_strategy="evolutionary",
                         rand_state=0)
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


# ------------------------------------------------------------------------------ depthwise convs
def _prepared_kernels(model, x):
    """The fused PrimFuncs omnic tunes for ``model`` on this CPU (fp32, tagged)."""
    from omnic.compile import frontend, pipeline
    from omnic.compile.target import tvm_target

    traced, deployment = engine._coerce(model, Deployment(device="host", threads=2), x)
    spec = deployment.spec
    target = tvm_target(spec, num_threads=2)
    return pipeline.prepare(frontend.lower(traced), spec, target, "fp32"), target


def _depthwise_kernel(model, x):
    import tvm

    mod, target = _prepared_kernels(model, x)
    found = [(gv, f) for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and schedule_rules.DEPTHWISE_RULE in f.script()]
    assert len(found) == 1, [gv.name_hint for gv, _ in mod.functions_items()]
    return tvm.IRModule({"main": found[0][1].with_attr("global_symbol", "main")}), target


class DepthwiseBlock(nn.Module):
    def __init__(self, channels, stride, residual=False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.residual = residual

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y + x if self.residual else nn.functional.relu6(y)


DEPTHWISE_CASES = {
    # name: (channels, spatial, stride, residual)
    "16 lanes, relu6, stride 1": (32, 14, 1, False),
    "8 lanes (24 channels), stride 2": (24, 16, 2, False),
    "width 7 (no tile of 4 or 8), residual add": (16, 7, 1, True),
    "width 17 (prime: a predicated tile of 8), stride 1": (16, 17, 1, False),
}


@pytest.mark.parametrize("name", list(DEPTHWISE_CASES))
def test_every_variant_of_the_depthwise_design_space_computes_the_conv(name):
    """Each candidate (after MetaSchedule's postprocs, as the tuner builds it) matches the
    unscheduled kernel, and the space holds register-tiled candidates with the epilogue fused."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    channels, size, stride, residual = DEPTHWISE_CASES[name]
    block = DepthwiseBlock(channels, stride, residual).eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    mod, target = _depthwise_kernel(block, torch.randn(1, channels, size, size))
    schedule_rules.register()
    assert schedule_rules.space_revision(mod, target) == schedule_rules.SPACE_REVISION
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", search_strategy="evolutionary")
    spaces = ctx.generate_design_space()
    assert len(spaces) >= 4

    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in param.ty.shape] for param in mod["main"].params]
    args = [rng.standard_normal(s).astype("float32") for s in shapes[:-1]]
    expected = tvm.runtime.tensor(np.zeros(shapes[-1], "float32"), dev)
    tvm.compile(mod, target)["main"](*[tvm.runtime.tensor(a, dev) for a in args], expected)
    # the unscheduled kernel is PyTorch's depthwise conv (NHWC input, OHWI weight, folded bias)
    x, weight, bias = (torch.from_numpy(a) for a in args[:3])
    conv = nn.functional.conv2d(x.permute(0, 3, 1, 2), weight.permute(0, 3, 1, 2), stride=stride, padding=1,
                                groups=channels).permute(0, 2, 3, 1) + bias
    torch_out = conv + torch.from_numpy(args[3]) if residual else conv.clamp(0, 6)
    np.testing.assert_allclose(expected.numpy(), torch_out.numpy(), rtol=1e-5, atol=1e-5)

    register_tiled = 0
    for space in spaces:
        sch = space.copy()
        assert all(pp.apply(sch) for pp in ctx.space_generator.postprocs), sch.trace
        text = sch.mod.script()
        register_tiled += "T.unroll" in text and 'scope="local"' in text and "T.vectorized" in text
        out = tvm.runtime.tensor(np.zeros(shapes[-1], "float32"), dev)
        tvm.compile(sch.mod, target)["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert register_tiled >= 1


def test_only_depthwise_convs_are_tagged():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Conv2d(3, 16, 3, padding=1)  # rc = 3 x 3 x 3
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # 4 input channels per group
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.odd_depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # < 4 lanes: generic rules
            self.pointwise = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            y = self.pointwise(self.depthwise(self.grouped(self.dense(x))))
            return self.odd_depthwise(y[:, :6])

    mod, _ = _prepared_kernels(Mixed().eval(), torch.randn(1, 3, 12, 12))
    tagged = [gv.name_hint for gv, f in mod.functions_items() if schedule_rules.DEPTHWISE_RULE in f.script()]
    assert len(tagged) == 1 and "conv2d" in tagged[0]


def test_a_tuned_depthwise_kernel_comes_from_the_rule(fresh_cache):
    """The depthwise task gets measured candidates (the postprocs accept the rule's schedules),
    and the build applies one: the depthwise kernel is scheduled, register-tiled, and correct."""
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU6(), DepthwiseBlock(32, 1), nn.Conv2d(32, 8, 1)).eval()
    x = torch.randn(1, 8, 16, 16)
    with tuning.using(FAST):
        dm = engine.compile(model, Deployment(device="host", tuning_trials=24), x, progress=False)
    assert dm.report["max_rel_error"] <= 1e-4
    tasks = {t["name"]: t for t in dm.report["tuning"]["per_task"]}
    measured_convs = [t for t in tasks.values() if t["name"].startswith("fused_conv2d") and t["best_ms"]
                      and t["trials_run"] > 0]
    assert len(measured_convs) == 3, tasks  # the two pointwise convs and the depthwise one
    kernels = [f.script() for gv, f in dm.module.functions_items() if schedule_rules.DEPTHWISE_RULE in f.script()]
    assert len(kernels) == 1 and '"tirx.is_scheduled": True' in kernels[0] and "T.unroll" in kernels[0]
