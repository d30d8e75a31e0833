"""The default CPU schedules of NHWC depthwise convs and of pooling: untuned builds of odd shapes
(channels that are no multiple of the vector width, 3x3/5x5/7x7 windows, strides, padding,
ceil-mode and count_include_pad pools, adaptive and global pools) match PyTorch (``engine.compile``
refuses outputs that do not) and their kernels come from the rules; the schedules are the
register-tiled, vectorized ones the rules exist for; an aarch64 target builds them."""
from __future__ import annotations

import torch
from torch import nn

from omnic import engine

DEPTHWISE = "default:depthwise_nhwc"
POOL = "default:pool"


class DepthwiseConvs(nn.Module):
    """Depthwise convs of several windows, strides, paddings and channel counts (one fused kernel
    each, with different epilogues) on one 3-channel input, concatenated."""

    def __init__(self):
        super().__init__()
        self.to24, self.to100, self.to17 = nn.Conv2d(3, 24, 1), nn.Conv2d(3, 100, 1), nn.Conv2d(3, 17, 1)
        self.c3 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.c3x2 = nn.Conv2d(3, 6, 5, stride=2, padding=2, groups=3)  # channel multiplier 2
        self.c24_7 = nn.Conv2d(24, 24, 7, padding=3, groups=24)
        self.c24_s2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.c24_rect = nn.Conv2d(24, 24, (3, 5), stride=(1, 2), padding=(0, 1), groups=24)
        self.c100_5 = nn.Conv2d(100, 100, 5, padding=2, groups=100)
        self.c100_s2 = nn.Conv2d(100, 100, 3, stride=2, groups=100)
        self.c17 = nn.Conv2d(17, 17, 3, padding=2, dilation=2, groups=17)  # one vector and a predicated one

    def forward(self, x):
        x24, x100 = self.to24(x), self.to100(x)
        outs = [nn.functional.relu6(self.c3(x)), nn.functional.hardswish(self.c3x2(x)),
                self.c24_7(x24) + x24,  # a residual epilogue
                nn.functional.hardswish(self.c24_s2(x24)), torch.relu(self.c24_rect(x24)),
                nn.functional.relu6(self.c100_5(x100)), self.c100_s2(x100), self.c17(self.to17(x))]
        return torch.cat([o.flatten(1) for o in outs], 1)


class Pools(nn.Module):
    def forward(self, x):
        outs = [torch.relu(nn.functional.max_pool2d(x, 3, 2, 1)),
                nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                nn.functional.max_pool2d(x, 2),
                nn.functional.avg_pool2d(x, 3, 2, 1),
                nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False, ceil_mode=True),
                nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False),
                nn.functional.adaptive_avg_pool2d(x, 1),
                nn.functional.adaptive_avg_pool2d(x, (3, 4)),  # windows of varying size
                nn.functional.adaptive_avg_pool2d(x, 2) * 2.0,
                x.mean((2, 3))]
        return torch.cat([o.flatten(1) for o in outs], 1)


class PoolsBothLayouts(nn.Module):
    """The pools on a 5-channel NCHW input and, after a 1x1 conv, on its 24 channels in NHWC."""

    def __init__(self):
        super().__init__()
        self.stem, self.pools = nn.Conv2d(5, 24, 1), Pools()

    def forward(self, x):
        return torch.cat([self.pools(x), self.pools(self.stem(x))], 1)


def _provenance(dm) -> dict[str, str | None]:
    import tvm

    return {gv.name_hint: (f.attrs.get("omnic.schedule") if f.attrs is not None else None)
            for gv, f in dm.module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def _depthwise_kernels(dm) -> dict[str, str | None]:
    """Provenance of each kernel holding a depthwise conv (its weight has one input channel)."""
    import tvm

    found = {}
    for gv, f in dm.module.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint and "group_conv2d_nhwc" in f.script():
            found[gv.name_hint] = f.attrs.get("omnic.schedule")
    return found


def test_depthwise_convs_of_odd_shapes_build_from_the_rule_and_match_torch():
    dm = engine.compile(DepthwiseConvs().eval(), "host", torch.randn(1, 3, 11, 10))  # refuses a wrong output
    kernels = _depthwise_kernels(dm)
    assert len(kernels) == 8, kernels
    assert set(kernels.values()) == {DEPTHWISE}, kernels


def test_pools_build_from_the_rule_and_match_torch():
    dm = engine.compile(PoolsBothLayouts().eval(), "host", torch.randn(1, 5, 11, 10))
    kernels = _provenance(dm)
    pools = {k: v for k, v in kernels.items() if "pool" in k}
    assert len(pools) == 16 and set(pools.values()) == {POOL}, pools  # 8 TOPI pools per layout
    # the global means: NHWC ones are pools; an NCHW mean over the innermost axes is a plain row
    # reduction, the reduction rule's kernel
    means = sorted(v or "" for k, v in kernels.items() if k.startswith("mean"))
    assert means == sorted([POOL, POOL, "default:reduction", "default:reduction"]), kernels


def test_the_schedules_are_vectorized_register_tiles_with_the_epilogue_fused():
    import tvm
    import tvm_ffi

    from omnic.compile import frontend, pipeline
    from omnic.compile.rules.cpu import DepthwiseNHWC, Pool, apply_default_schedules
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Hardswish(),
                          nn.MaxPool2d(3, 2, 1)).eval()
    spec = Deployment.coerce("host").spec
    prepared = pipeline.prepare(frontend.lower(trace(model, torch.randn(1, 3, 16, 16))), spec,
                                tvm_target(spec, num_threads=2))
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 4})
    mod, outcomes = apply_default_schedules(prepared, avx2, (DepthwiseNHWC(), Pool()))
    by_rule = {o.rule: o.kernel for o in outcomes if o.rule}
    assert set(by_rule) == {"depthwise_nhwc", "pool"}, outcomes
    conv = mod[by_rule["depthwise_nhwc"]].script()
    # one kernel: the weight re-layout (folded at build time), then the tiles, nothing at the root
    assert "meta_schedule.layout_rewrite_preproc" in conv
    assert "T.parallel" in conv and "T.unroll" in conv
    assert "T.vectorized(T.int64(8))" in conv and "T.vectorized(T.int64(16))" not in conv  # AVX2: 8 lanes
    assert conv.count('scope="local"') == 1  # the accumulator tile
    assert "pad_temp" not in conv and "T_add_intermediate" not in conv  # padding and epilogue fused
    pool = mod[by_rule["pool"]].script()
    assert "T.vectorized" in pool and "pad_temp" not in pool
    # a deterministic function of the kernel and the target
    again, _ = apply_default_schedules(prepared, avx2, (DepthwiseNHWC(), Pool()))
    assert all(tvm_ffi.structural_equal(mod[name], again[name]) for name in by_rule.values())


def test_the_rules_build_for_an_aarch64_target():
    import tvm

    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24), nn.ReLU6(),
                          nn.AvgPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(1)).eval()
    dm = engine.compile(model, "rasp4b", torch.randn(1, 3, 15, 15))  # arm/rasp4b64: built, not run
    kernels = _provenance(dm)
    assert sorted(v for v in kernels.values() if v in (DEPTHWISE, POOL)) == [DEPTHWISE, POOL, POOL], kernels
    assert all(kernels.values()), kernels  # the other rules take the rest
    conv = next(f for gv, f in dm.module.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc) and kernels[gv.name_hint] == DEPTHWISE).script()
    assert "T.vectorized(T.int64(4))" in conv and "T.vectorized(T.int64(8))" not in conv  # NEON: 4 lanes
