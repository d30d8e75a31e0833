"""Winograd convolutions (omnic.compile.winograd): the transforms are right, the kernel computes the conv for
odd shapes and paddings, every schedule in its tuning design space computes it too, and a tuned
compile uses it exactly where it is eligible (untuned builds keep direct convs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from omnic import Deployment, engine
from omnic.compile import frontend, pipeline
from omnic.compile import rules as schedule_rules
from omnic.compile import tuning
from omnic.compile import winograd
from omnic.compile.target import tvm_target
from tests.test_tuning import FAST

CPU = {"kind": "llvm", "num-cores": 2}
VECTORIZED, UNROLLED = 2, 3  # tvm.tirx.ForKind


@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_a_3_tap_correlation(m):
    AT, G, BT = winograd.transform_matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), np.correlate(d, g, "valid"), rtol=1e-12, atol=1e-12)


def _conv_module(shape, weight, padding, m):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        y = bb.emit_te(lambda d, u: winograd.winograd_conv2d_nhwc(d, u, padding=padding, m=m), x,
                       relax.const(winograd.transform_weight(weight, m)))
        bb.emit_func_output(y)
    return bb.get()


def _torch_conv_nhwc(x, w, padding):
    top, left, bottom, right = padding
    t = nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
    return nn.functional.conv2d(t, torch.from_numpy(w).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape,out_channels,padding,m", [
    ((1, 13, 11, 5), 7, (1, 1, 1, 1), 4),   # output not a multiple of the tile, odd channels
    ((1, 9, 10, 8), 6, (1, 0, 0, 1), 2),    # asymmetric padding
    ((2, 6, 6, 4), 3, (0, 0, 0, 0), 4),     # batch 2, no padding, a single partial tile
])
def test_the_kernel_computes_the_convolution(shape, out_channels, padding, m):
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    w = rng.standard_normal((out_channels, 3, 3, shape[3])).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(_conv_module(shape, w, padding, m), tvm.target.Target(CPU)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    expected = _torch_conv_nhwc(x, w, padding)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() / np.abs(expected).max() < 1e-5


def test_eligibility():
    base = dict(kernel=(3, 3), strides=(1, 1), dilation=(1, 1), groups=1, in_channels=64, out_channels=64,
                out_hw=(56, 56), dtype="float32")
    assert winograd.eligible(**base)
    assert winograd.tile_size(56, 56) == 4 and winograd.tile_size(14, 14) == 2
    assert winograd.eligible(**{**base, "out_hw": (14, 14)})  # m = 2: 49 tiles
    assert winograd.eligible(**{**base, "out_hw": (7, 7)})  # m = 2: 16 tiles
    assert not winograd.eligible(**{**base, "out_hw": (6, 6)})  # 9 tiles: the weights would dominate
    assert not winograd.eligible(**{**base, "strides": (2, 2)})
    assert not winograd.eligible(**{**base, "groups": 64})
    assert not winograd.eligible(**{**base, "kernel": (1, 1)})
    assert not winograd.eligible(**{**base, "in_channels": 3})
    assert not winograd.eligible(**{**base, "dtype": "float16"})


class Mixed(nn.Module):
    """Two eligible convs of one shape (16 -> 16 at 28x28: 49 tiles of 4x4), one with a residual
    add and relu fused, one with relu only; and convs that are not eligible: 3 input channels,
    stride 2, depthwise, 1x1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.wino = nn.Conv2d(16, 16, 3, padding=1)
        self.wino2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.wino(h) + h)
        h = torch.relu(self.wino2(h))
        return self.pw(torch.relu(self.dw(self.down(h)))).mean((2, 3))


def _mixed():
    torch.manual_seed(0)
    return Mixed().eval(), torch.randn(1, 3, 28, 28)


def test_every_variant_of_the_design_space_computes_the_conv():
    """The fused Winograd kernel (transforms, GEMM, residual add, relu) under every schedule of
    its design space: omnic's transform rule x MetaSchedule's GEMM tilings."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from omnic.engine import _coerce

    model, x = _mixed()
    traced, deployment = _coerce(model, Deployment(device="host"), x)
    target = tvm_target(deployment.spec, num_threads=2)
    prepared = pipeline.prepare(frontend.lower(traced), deployment.spec, target, winograd=True)
    assert winograd.count_convs(prepared) == 2
    names = [gv.name_hint for gv, f in prepared.functions_items() if "winograd" in gv.name_hint]
    residual = [n for n in names if "_add_add" in n and "relu" in n]  # bias, residual, relu fused
    assert len(names) == 2 and len(residual) == 1, names
    func = prepared[residual[0]]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    schedule_rules.register()
    tuning.light_tensor_intrinsics(target)  # TuneContext would import every backend's intrinsics
    assert schedule_rules.space_revision(mod, target) == schedule_rules.SPACE_REVISION
    ctx = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", search_strategy="evolutionary")
    spaces = ctx.generate_design_space()
    assert len(spaces) >= 9  # 3 data x 3 inverse transform variants, times the GEMM's tilings

    # inputs: the activation after the stem, the transformed weight, the bias, the residual
    rng = np.random.default_rng(1)
    params = [p for p in func.params]
    args = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in params[:-1]]
    h, u, bias = args[0], args[1], args[2]
    residual = args[3] if len(args) > 3 else h
    w = model.wino.weight.detach().permute(0, 2, 3, 1).numpy()
    expected = np.maximum(_torch_conv_nhwc(h, w, (1, 1, 1, 1)) + bias.reshape(1, 1, 1, -1) + residual, 0)
    # the kernel's weight argument is U of the model's weight: feed exactly that
    args[1] = winograd.transform_weight(w, 4)
    unrolled_and_vectorized = 0
    dev = tvm.cpu(0)
    for space in spaces:
        sch = space.copy()
        assert all(pp.apply(sch) for pp in ctx.space_generator.postprocs)
        kinds = {int(sch.get(loop).kind) for name in ("winograd_data", "winograd_inverse")
                 for loop in sch.get_loops(sch.get_sblock(name))}
        unrolled_and_vectorized += {VECTORIZED, UNROLLED} <= kinds
        lib = tvm.compile(sch.mod, target)
        out = tvm.runtime.tensor(np.zeros(expected.shape, "float32"), dev)
        lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert unrolled_and_vectorized == len(spaces)


def test_a_tuned_compile_runs_eligible_convs_as_winograd(fresh_cache):
    model, x = _mixed()
    untuned = engine.compile(model, Deployment(device="host"), x, progress=False)
    assert untuned.report["winograd_convs"] == 0  # no database: the direct convs
    with tuning.using(FAST):
        # a short budget keeps direct convs (Winograd tasks are slow to tune)
        short = engine.compile(model, Deployment(device="host", tuning_trials=8), x, progress=False)
        assert short.report["winograd_convs"] == 0 and short.report["max_rel_error"] <= 1e-4
        # a budget of winograd.MIN_TUNING_S (capped here at 16 trials) uses them
        tuned = engine.compile(model, Deployment(device="host", tuning_trials=16,
                                                 tuning_time_s=winograd.MIN_TUNING_S), x, progress=False)
    assert tuned.report["winograd_convs"] == 2
    assert tuned.report["max_rel_error"] <= 1e-4
    # one task per distinct fused kernel: a trace tuned for one epilogue is not replayed onto
    # the other (TVM 0.27 fails to, see winograd.tag_fused_kernels)
    tasks = [t["name"] for t in tuned.report["tuning"]["per_task"] if "winograd" in t["name"]]
    assert len(tasks) == 2, tasks
    # a later compile without a tuning budget applies the same database: Winograd again
    again = engine.compile(model, Deployment(device="host"), x, progress=False)
    assert again.report["winograd_convs"] == 2 and again.report["max_rel_error"] <= 1e-4
