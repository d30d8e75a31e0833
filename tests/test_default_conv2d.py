"""The default conv2d_nhwc rule: untuned builds of dense and grouped convs of awkward shapes (channels
off the vector width, 7x7 to 1x1 kernels, stride 2, dilation, groups, a 3-channel stem, residual
epilogues, batch 2) match PyTorch with every such conv scheduled by the rule and depthwise convs
left alone, the weight re-layout folded at compile time and the code vectorized; weights that
are not layout-free, and epilogues kept off the tile, still compute the conv; AVX2 builds run and
NEON builds compile."""
from __future__ import annotations

import dataclasses
import platform
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from omnic import engine
from omnic.compile.rules.cpu import conv2d
from omnic.compile.rules.cpu.base import PROVENANCE_ATTR, vector_bits

RULE = "default:conv2d_nhwc"


class Chain(nn.Module):
    """Convs one after the other, each followed by an activation, with optional residual adds."""

    def __init__(self, convs, act=nn.ReLU, residual=()):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.act = act()
        self.residual = set(residual)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            y = self.act(conv(x))
            x = y + x if i in self.residual else y
        return x


MODELS = {
    # name: (model, input shape, convs the rule must schedule, depthwise convs it must leave)
    "7x7/2 stem from 3 channels to 24, 1x1 to 40": (
        lambda: Chain([nn.Conv2d(3, 24, 7, 2, 3), nn.Conv2d(24, 40, 1)]), (1, 3, 19, 19), 2, 0),
    "5x5 to 100, 1x1 to 3, hardswish": (
        lambda: Chain([nn.Conv2d(8, 100, 5, 1, 2), nn.Conv2d(100, 3, 1)], act=nn.Hardswish), (1, 8, 11, 11), 2, 0),
    "groups 2 and 4, residual": (
        lambda: Chain([nn.Conv2d(16, 24, 3, 1, 1, groups=2), nn.Conv2d(24, 24, 3, 1, 1, groups=4)], residual=[1]),
        (1, 16, 9, 9), 2, 0),
    "batch 2, residual ReLU6, stride 2": (
        lambda: Chain([nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 2, 1)], act=nn.ReLU6, residual=[0]),
        (2, 16, 10, 10), 2, 0),
    "dilation 2, stride 2, depthwise between": (
        lambda: Chain([nn.Conv2d(8, 16, 3, 2, 2, dilation=2), nn.Conv2d(16, 16, 3, 1, 1, groups=16),
                       nn.Conv2d(16, 72, 1)]), (1, 8, 13, 13), 2, 1),
}

#: models whose convs all have multiples of 16 output channels
FULL_WIDTH = {"batch 2, residual ReLU6, stride 2"}


def _kernels(dm):
    import tvm

    return {gv.name_hint: f for gv, f in dm.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("name", list(MODELS))
def test_untuned_convs_match_pytorch_and_come_from_the_rule(name):
    make, shape, dense, depthwise = MODELS[name]
    model = make().eval()
    dm = engine.compile(model, "host", torch.randn(*shape), progress=False)  # refuses beyond 1e-4
    assert dm.report.max_rel_error is not None and dm.report.max_rel_error < 1e-4
    convs = {n: f for n, f in _kernels(dm).items() if "conv2d" in n}
    by_rule = [n for n, f in convs.items() if f.attrs.get(PROVENANCE_ATTR) == RULE]
    assert len(by_rule) == dense, sorted(convs)
    assert len(convs) - len(by_rule) == depthwise, sorted(convs)
    # the weight re-layout was split out of the kernels and folded: each takes its packed weight
    for n in by_rule:
        assert n.endswith("_prepacked")
        assert "layout_rewrite_preproc" not in convs[n].script()
        assert any(len(p.shape) == 5 for p in convs[n].params)
    # vectorized: packed FMAs on the widest registers of an AVX2 or AVX-512 host
    from omnic.compile.target import tvm_target

    bits = vector_bits(tvm_target(dm.deployment.spec, 2))
    if platform.machine() in ("x86_64", "AMD64") and bits >= 256:
        # multiples of 16 channels fill AVX-512's zmm; 24 or 40 take 8-lane ymm, 100 4-lane xmm
        register = "zmm" if bits == 512 and name in FULL_WIDTH else "[xyz]mm"
        assert re.search(rf"vfmadd\w*ps\s+%{register}", dm.executable.mod.imports[0].inspect_source("asm"))


def _kernel(model, shape, spec=None):
    """The prepared conv kernel of ``model`` (the first PrimFunc with a conv), and its target."""
    import tvm

    from omnic.compile import frontend, pipeline
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    spec = spec or Deployment.coerce("host").spec
    target = tvm_target(spec, num_threads=2)
    mod = pipeline.prepare(frontend.lower(trace(model.eval(), torch.randn(*shape))), spec, target)
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint:
            return f, target
    raise AssertionError("no conv kernel")


def _run(func, target, arrays):
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _compare(plain, scheduled, target, host_target=None):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in plain.params]
    expected = _run(plain, host_target or target, arrays)
    got = _run(scheduled, target, arrays)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_not_layout_free_are_packed_per_call_and_unfused_epilogues_still_compute():
    func, target = _kernel(Chain([nn.Conv2d(12, 40, 3, 2, 1)], act=nn.Hardswish), (1, 12, 11, 11))
    runtime_weights = func.without_attr("layout_free_buffers")
    sch = conv2d.Conv2dNHWC().schedule(runtime_weights, target)
    assert sch is not None and "layout_rewrite_preproc" not in sch.mod["main"].script()
    _compare(func, sch.mod["main"], target)
    unfused = conv2d._schedule(func, target, fuse_epilogue=False)
    _compare(func, unfused.mod["main"], target)


def test_avx2_build_runs_and_neon_build_compiles():
    import tvm

    from omnic.compile import build, frontend, pipeline
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    host = Deployment.coerce("host").spec
    avx2 = dataclasses.replace(host, target={"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    func, target = _kernel(Chain([nn.Conv2d(8, 24, 3, 1, 1)]), (1, 8, 10, 10), avx2)
    sch = tvm.s_tir.Schedule(func)
    assert conv2d.choose_tile(conv2d._analyse(sch, conv2d._find_conv(sch), func), target).vector == 8
    _compare(func, conv2d.Conv2dNHWC().schedule(func, target).mod["main"], target)

    spec = Deployment.coerce("rasp4b").spec
    target = tvm_target(spec, num_threads=2)
    model = Chain([nn.Conv2d(3, 24, 3, 2, 1), nn.Conv2d(24, 20, 1)]).eval()
    prepared = pipeline.prepare(frontend.lower(trace(model, torch.randn(1, 3, 16, 16))), spec, target)
    built = build.build_result(prepared, spec, target)
    assert sorted(d.rule for d in built.defaults if "conv2d" in d.kernel) == ["conv2d_nhwc", "conv2d_nhwc"]
    assert re.search(r"fmla\s+v\d+\.4s", built.executable.mod.imports[0].inspect_source("asm"))


@pytest.mark.parametrize("channels,lanes,expected", [
    (64, 16, (16, 2)), (48, 16, (16, 3)), (16, 16, (16, 1)), (24, 16, (8, 3)), (40, 16, (8, 5)),
    (100, 16, (4, 5)), (3, 16, (1, 3)), (96, 8, (8, 2)), (72, 4, (4, 2)),
])
def test_channel_tile_is_whole_power_of_two_vectors(channels, lanes, expected):
    vector, blocks = conv2d._choose_channels(channels, lanes)
    assert (vector, blocks) == expected
    assert channels % (vector * blocks) == 0 and vector & (vector - 1) == 0
