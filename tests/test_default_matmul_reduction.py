"""The default CPU schedules of matmuls and reductions (omnic.compile.rules.cpu.matmul / .reduction):
real untuned builds on odd shapes match PyTorch (engine.compile checks them) and their kernels carry
the rule's provenance; a transposed operand, pooling kernels and an AArch64 target are handled."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omnic import engine

MATMUL, REDUCTION = "default:matmul", "default:reduction"


def _provenance(dm) -> dict[str, str | None]:
    """Each kernel of the build: its ``omnic.schedule`` attribute (None when unscheduled)."""
    import tvm

    out = {}
    for gv, func in dm.module.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            out[gv.name_hint] = str(attrs["omnic.schedule"]) if attrs is not None and "omnic.schedule" in attrs else None
    return out


def _kernels(prov: dict, *words: str) -> dict:
    return {k: v for k, v in prov.items() if any(w in k for w in words)}


def _compile(model, x):
    dm = engine.compile(model.eval(), "host", x, progress=False)
    assert dm.report["max_rel_error"] is not None and dm.report["max_rel_error"] < 1e-4
    return dm


class LinearGelu(nn.Module):
    """Linear 37 -> 100 with bias and GELU on 197 rows and on one row (a GEMV)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(37, 100), nn.GELU())
        self.head = nn.Linear(37, 10)

    def forward(self, x):
        return torch.cat([self.fc(x), self.fc(x[:1]) * 2.0], 0).sum(-1) + self.head(x[:1]).sum()


def test_linear_gelu_on_many_rows_and_one_row():
    dm = _compile(LinearGelu(), torch.randn(197, 37))
    matmuls = _kernels(_provenance(dm), "matmul")
    assert len(matmuls) >= 3, matmuls  # 197 rows, one row (x2 weights)
    assert set(matmuls.values()) == {MATMUL}, matmuls


class Attention(nn.Module):
    """Batch matmuls, 4-D (heads) and 3-D, with odd sizes, around a softmax over the last axis."""

    def forward(self, x):  # x: (2, 3, 21, 13)
        attn = torch.softmax(torch.matmul(x, x.transpose(-1, -2)) * 0.3, dim=-1)
        out4 = torch.matmul(attn, x)
        y = x.reshape(6, 21, 13)
        out3 = torch.bmm(y.transpose(1, 2), y)  # (6, 13, 13)
        return torch.cat([out4.flatten(), out3.flatten()])


def test_batch_matmuls_3d_and_4d_and_softmax():
    dm = _compile(Attention(), torch.randn(2, 3, 21, 13))
    prov = _provenance(dm)
    matmuls = _kernels(prov, "matmul")
    assert len(matmuls) >= 3 and set(matmuls.values()) == {MATMUL}, prov
    softmax = _kernels(prov, "softmax")
    assert softmax and set(softmax.values()) == {REDUCTION}, prov


class Reductions(nn.Module):
    """Softmax over axis 1, log-softmax, layer norm of odd width, mean over (2, 3) and over -1,
    sum and max reductions."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(11)

    def forward(self, x):  # x: (2, 7, 9, 11)
        parts = [torch.softmax(x, 1), torch.log_softmax(x, -1), self.norm(x), x.mean((2, 3)), x.mean(-1),
                 x.sum(1), x.max().reshape(1)]
        return torch.cat([p.flatten() for p in parts])


def test_softmax_layernorm_mean_sum_max():
    dm = _compile(Reductions(), torch.randn(2, 7, 9, 11))
    prov = _provenance(dm)
    reductions = _kernels(prov, "softmax", "layer_norm", "mean", "sum", "max")
    assert len(reductions) >= 6, prov
    # a mean over an NHWC map's spatial axes is a global pool (the pool rule runs first and takes
    # it, channels vectorized); every other reduction is this rule's
    assert set(reductions.values()) <= {REDUCTION, "default:pool"}, prov
    assert sum(v == REDUCTION for v in reductions.values()) >= 5, prov


class FullMean(nn.Module):
    def forward(self, x):
        return x.mean((0, 1, 2)) + 1.0


def test_a_mean_over_every_axis_with_its_epilogue():
    # found by fuzzing: the scalar epilogue block has no loop, and rfactor beside it failed
    dm = _compile(FullMean(), torch.randn(18, 9, 12))
    means = _kernels(_provenance(dm), "mean")
    assert means and set(means.values()) == {REDUCTION}, means


class ConvPool(nn.Module):
    """Global average pooling of NHWC conv output (a mean over H, W), next to a max pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.gap(y).flatten(1) + y.mean((2, 3)) + self.pool(y).mean((2, 3))


def test_global_average_pool_is_scheduled_and_pools_are_left_alone():
    dm = _compile(ConvPool(), torch.randn(1, 3, 17, 17))
    prov = _provenance(dm)
    means = _kernels(prov, "mean")
    # NHWC global means go to the pool rule, which comes first; either way never a plain loop
    assert means and set(means.values()) <= {REDUCTION, "default:pool"}, prov
    pools = _kernels(prov, "pool")
    assert pools and all(v != REDUCTION for v in pools.values()), prov


def _transposed_bmm():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def bmm(a: T.Buffer((3, 19, 24), "float32"), b: T.Buffer((3, 37, 24), "float32"),
            c: T.Buffer((3, 19, 37), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for n, i, j, k in T.grid(3, 19, 37, 24):
            with T.sblock("bmm"):
                vn, vi, vj, vk = T.axis.remap("SSSR", [n, i, j, k])
                with T.init():
                    c[vn, vi, vj] = T.float32(0)
                c[vn, vi, vj] = c[vn, vi, vj] + a[vn, vi, vk] * b[vn, vj, vk]

    return bmm


def test_activation_operand_with_k_innermost_is_repacked_per_call():
    import tvm

    from omnic.compile.rules.cpu.matmul import MatmulRule

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    sch = MatmulRule().apply(_transposed_bmm(), target, False)
    assert sch is not None
    # a deterministic function of the kernel and the target
    tvm.ir.assert_structural_equal(sch.mod, MatmulRule().apply(_transposed_bmm(), target, False).mod)
    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 19, 24), "float32"), rng.standard_normal((3, 37, 24), "float32")
    c = tvm.runtime.tensor(np.zeros((3, 19, 37), "float32"))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_pooling_blocks_are_not_this_rules():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from omnic.compile.rules.cpu.reduction import ReductionRule

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 9, 9, 8), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.nn.max_pool2d(x, pool_size=(2, 2), strides=(2, 2), layout="NHWC")))
    mod = relax.transform.LegalizeOps()(bb.get())
    kernel = next(f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    assert ReductionRule().apply(kernel, tvm.target.Target({"kind": "llvm", "num-cores": 2}), False) is None


@pytest.mark.parametrize("model_input", ["transformer"])
def test_kernels_schedule_and_build_for_aarch64(model_input):
    import tvm

    from omnic.compile import frontend, pipeline
    from omnic.compile.build import _fold_weight_layouts
    from omnic.compile.rules.cpu import (
        DEFAULT_RULES,
        apply_default_schedules,
        vector_lanes,
    )
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace
    from omnic.examples import zoo

    arm = tvm.target.Target("arm/rasp4b64")
    assert vector_lanes(arm) == 4
    dep = Deployment.coerce("host")
    model, x = zoo.TransformerBlock(48, 3, 2).eval(), torch.randn(1, 37, 48)
    mod = pipeline.prepare(frontend.lower(trace(model, x)), dep.spec, tvm_target(dep.spec, num_threads=2))
    mod, outcomes = apply_default_schedules(mod, arm, DEFAULT_RULES)
    rules = {o.kernel: o.rule for o in outcomes}
    assert {v for k, v in rules.items() if "matmul" in k} == {"matmul"}, rules
    assert {v for k, v in rules.items() if "softmax" in k or "layer_norm" in k} == {"reduction"}, rules
    assert not [o for o in outcomes if o.errors and o.rule in ("matmul", "reduction")]
    tvm.compile(_fold_weight_layouts(mod, arm), target=arm)  # builds (it cannot run here)
