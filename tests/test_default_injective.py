"""The default injective CPU rule and the fallback (omnic.compile.rules.cpu.{injective,fallback}):
models made of elementwise ops, transposes, reshapes, concat/split/slices, pads, resizes, gathers
and casts on odd shapes build on host, match PyTorch and have every such kernel scheduled by the
injective rule; the rule schedules every spatial op Relax legalizes (compared with the same
kernel unscheduled), tiles transposes, keeps tiny kernels on one thread and does not recompute
expensive elements; the fallback parallelizes kernels with reductions."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnic import engine

#: name tokens of the Relax ops whose kernels hold a reduction (the injective rule leaves them)
REDUCTION_TOKENS = {"mean", "sum", "max", "min", "prod", "variance", "std", "softmax", "norm", "matmul",
                    "conv2d", "pool2d", "argmax", "argmin", "cumsum", "dense"}


def is_spatial_kernel(name: str) -> bool:
    """Whether a fused kernel's name lists only spatial ops (``fused_transpose1_add2`` yes,
    ``fused_mean_add1`` no)."""
    return not {re.sub(r"\d+$", "", t) for t in name.split("_")} & REDUCTION_TOKENS


def kernels(dm) -> dict[str, tuple[str | None, str]]:
    """``name -> (omnic.schedule, TVMScript)`` of every PrimFunc of a build."""
    import tvm

    out = {}
    for gv, func in dm.module.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            out[gv.name_hint] = (attrs.get("omnic.schedule") if attrs is not None else None, func.script())
    return out


# ------------------------------------------------------------------------------------- models
class Elementwise(nn.Module):
    """hard-swish, sigmoid, GELU (erf), clip, relu, exp, abs, per-channel broadcasts."""

    def __init__(self, c: int):
        super().__init__()
        self.b = nn.Parameter(torch.randn(1, c, 1, 1))
        self.s = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        y = F.hardswish(x) * torch.sigmoid(x) + F.gelu(x)
        y = torch.clamp(y + self.b, -2.0, 3.0) * self.s
        return torch.relu(y) + torch.exp(-x.abs())


class Transposes(nn.Module):
    """NCHW -> NHWC, back, and a swap of the two inner axes, each with an elementwise op."""

    def forward(self, x):
        a = x.permute(0, 2, 3, 1).contiguous()
        return (a * 2.0).permute(0, 3, 1, 2) - x, x.transpose(2, 3) + 1.0, a


class ReshapeConcatSplit(nn.Module):
    """split, concat (odd parts), flip, reshape, transpose, strided slice."""

    def forward(self, x):
        c = x.shape[1]
        p, q = torch.split(x, [c // 3, c - c // 3], dim=1)
        y = torch.cat([q * 2.0, p + 1.0, x.flip(-1)], dim=1)
        return y.reshape(1, -1, x.shape[3]).transpose(1, 2)[:, 1:-1:3] - 0.5


class PadResize(nn.Module):
    """constant pad, nearest x2 and bilinear (odd sizes) upsampling."""

    def forward(self, x):
        a = F.pad(x, (1, 2, 3, 0), value=0.5)
        b = F.interpolate(a, scale_factor=2, mode="nearest")
        c = F.interpolate(x, size=(x.shape[2] * 2 + 1, x.shape[3] + 3), mode="bilinear", align_corners=False)
        return b * 0.5, torch.sigmoid(c)


class GatherCast(nn.Module):
    """index_select (take), casts to int32 and back."""

    def __init__(self):
        super().__init__()
        self.register_buffer("idx", torch.tensor([2, 0, 1, 1, 5, 3, 4]))

    def forward(self, x):
        a = torch.index_select(x, 1, self.idx)
        return (a * 10).to(torch.int32).to(torch.float32) / 10 + a


CASES = [
    pytest.param(lambda: Elementwise(24), (1, 24, 17, 19), "multiply", id="elementwise-24x17x19"),
    pytest.param(lambda: Elementwise(100), (1, 100, 9, 13), "multiply", id="elementwise-100x9x13"),
    pytest.param(Transposes, (1, 3, 33, 35), "transpose", id="transpose-3x33x35"),
    pytest.param(Transposes, (1, 24, 20, 36), "transpose", id="transpose-24x20x36"),
    pytest.param(ReshapeConcatSplit, (1, 24, 15, 17), "concatenate", id="concat-split-24x15x17"),
    pytest.param(PadResize, (1, 3, 13, 11), "resize2d", id="pad-resize-3x13x11"),
    pytest.param(GatherCast, (1, 7, 5, 33), "take", id="take-cast-7x5x33"),
]


@pytest.mark.parametrize("factory, shape, op", CASES)
def test_spatial_models_match_pytorch_and_use_the_injective_rule(factory, shape, op):
    model = factory().eval()
    x = torch.randn(shape)
    dm = engine.compile(model, "host", x)  # refuses outputs off PyTorch's
    assert dm.report["max_rel_error"] is not None and dm.report["max_rel_error"] <= 1e-4
    assert dm.report["kernels_unscheduled"] == 0
    found = kernels(dm)
    spatial = {n: p for n, (p, _) in found.items() if is_spatial_kernel(n)}
    assert any(op in n for n in spatial), f"no {op} kernel in {sorted(found)}"
    assert all(p == "default:injective" for p in spatial.values()), spatial
    # exp, erf and sigmoid run as TOPI's vector polynomials, not libm calls
    assert not any(f in found[n][1] for n in spatial for f in ("T.exp(", "T.erf(", "T.sigmoid("))
    # kernels with a reduction (the means that make some outputs) are not the injective rule's
    assert all(p != "default:injective" for n, (p, _) in found.items() if not is_spatial_kernel(n))


def _single_kernel(dm, fragment: str) -> str:
    scripts = [s for n, (_, s) in kernels(dm).items() if fragment in n]
    assert len(scripts) == 1, sorted(kernels(dm))
    return scripts[0]


def test_a_large_transpose_is_tiled_vectorized_and_parallel():
    class NHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 2, 3, 1) * 3.0

    x = torch.randn(1, 64, 48, 40)
    script = _single_kernel(engine.compile(NHWC(), "host", x), "transpose")
    assert "T.parallel" in script and "T.vectorized" in script
    assert "T.unroll" in script  # the column of the 2-D tile


def test_a_tiny_kernel_stays_on_one_thread_but_is_vectorized():
    class Tiny(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2.0 + 1.0)

    script = _single_kernel(engine.compile(Tiny(), "host", torch.randn(1, 3, 5, 16)), "multiply")
    assert "T.parallel" not in script and "T.vectorized" in script


def test_an_expensive_producer_is_computed_once_per_element():
    """A sigmoid read by a bilinear resize (4 points per output) and a GELU that uses its input
    twice keep their producers materialized rather than recomputed per use; the build (with the
    sigmoid and the erf as vector polynomials) matches PyTorch."""
    import tvm

    from omnic.compile import frontend, pipeline
    from omnic.compile.rules.cpu.injective import schedule_spatial_kernel
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    class SigmoidResizeGelu(nn.Module):
        def forward(self, x):
            y = F.interpolate(torch.sigmoid(x) + 1.0, scale_factor=2, mode="bilinear", align_corners=False)
            return F.gelu(y)

    model, x = SigmoidResizeGelu(), torch.randn(1, 8, 20, 24)
    script = _single_kernel(engine.compile(model, "host", x), "resize2d")  # refuses outputs off PyTorch's
    assert "T.sigmoid(" not in script and "T.erf(" not in script  # TOPI's polynomials instead
    spec = Deployment.coerce("host").spec
    target = tvm_target(spec, num_threads=2)
    mod = pipeline.prepare(frontend.lower(trace(model, x)), spec, target)
    func = next(f for gv, f in mod.functions_items() if "resize2d" in gv.name_hint)
    assert isinstance(func, tvm.tirx.PrimFunc)
    plain = schedule_spatial_kernel(func, target, fast_math=False).mod["main"].script()
    assert plain.count("T.sigmoid(") == 1 and plain.count("T.erf(") == 1


# ------------------------------------------------------------------- the rules on single ops
def _relax_kernels(build_body, shapes: list[tuple[tuple[int, ...], str]], *, fuse: bool = False):
    """The legalized (and, with ``fuse``, fused) kernels of one Relax function
    ``build_body(bb, *vars)``."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, d)) for i, (s, d) in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build_body(bb, *params))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    if fuse:
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    return [(gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def _random_args(func, seed: int):
    import tvm

    rng = np.random.default_rng(seed)
    args = []
    for param in func.params:
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        if "int" in dtype:
            value = rng.integers(0, 3, size=shape).astype(dtype)
        elif dtype == "bool":
            value = rng.integers(0, 2, size=shape).astype(bool)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value))
    return args


def _same_results(func, scheduled, target) -> None:
    """Build ``func`` unscheduled and scheduled and compare their outputs on the same inputs."""
    import tvm

    results = []
    for f in (func, scheduled):
        lib = tvm.compile(f.with_attr("global_symbol", "main"), target=target)
        args = _random_args(func, seed=0)
        lib(*args)
        results.append([a.numpy() for a in args])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def _spatial_ops():
    from tvm import relax

    op = relax.op
    f32 = "float32"
    return [
        ("resize-nearest", lambda bb, x: op.image.resize2d(x, (23, 29), layout="NCHW", method="nearest_neighbor",
                                                           coordinate_transformation_mode="asymmetric",
                                                           rounding_method="floor"), [((1, 5, 9, 11), f32)]),
        ("resize-bilinear", lambda bb, x: op.image.resize2d(x, (17, 22), layout="NHWC", method="linear"),
         [((1, 9, 11, 24), f32)]),
        ("strided-slice", lambda bb, x: op.strided_slice(x, axes=[1, 3], begin=[1, 2], end=[20, 33], strides=[2, 3]),
         [((1, 24, 7, 35), f32)]),
        ("take", lambda bb, x, i: op.take(x, i, axis=1), [((3, 100, 5), f32), ((7,), "int64")]),
        ("concat", lambda bb, x, y: op.concat([x, y, x], axis=-1), [((1, 6, 5, 24), f32), ((1, 6, 5, 13), f32)]),
        ("split", lambda bb, x: op.split(x, [3, 10], axis=-1), [((2, 5, 17), f32)]),
        ("where", lambda bb, c, x, y: op.where(c, x, y), [((4, 33), "bool"), ((4, 33), f32), ((1, 33), f32)]),
        ("cast", lambda bb, x: op.astype(op.multiply(x, relax.const(10.0, f32)), "int32"), [((3, 50, 7), f32)]),
        ("broadcast", lambda bb, x: op.broadcast_to(x, (2, 24, 9, 11)), [((1, 24, 1, 11), f32)]),
        ("flip", lambda bb, x: op.flip(x, axis=2), [((1, 3, 19, 16), f32)]),
        ("tile", lambda bb, x: op.tile(x, (2, 1, 3)), [((5, 7, 3), f32)]),
        ("scalar", lambda bb, x, y: op.add(x, y), [((), f32), ((), f32)]),
        ("transpose-4d", lambda bb, x: op.permute_dims(x, [0, 2, 3, 1]), [((1, 100, 12, 20), f32)]),
        ("transpose-2d", lambda bb, x: op.permute_dims(x, [1, 0]), [((96, 130), f32)]),
        ("pad", lambda bb, x: op.nn.pad(x, (0, 0, 2, 1, 1, 3, 0, 0), pad_value=-1.0), [((1, 9, 10, 24), f32)]),
        ("big-elementwise", lambda bb, x: op.sigmoid(op.exp(op.multiply(x, x))), [((1, 64, 40, 40), f32)]),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _spatial_ops()])
def test_injective_rule_schedules_every_spatial_op_and_keeps_its_results(name):
    import tvm

    from omnic.compile.rules.cpu import FallbackRule, InjectiveRule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
    _, body, shapes = next(c for c in _spatial_ops() if c[0] == name)
    for kernel, func in _relax_kernels(body, shapes):
        sch = InjectiveRule().apply(func, target, False)
        assert sch is not None, f"{name}: {kernel} not taken"
        scheduled = sch.mod["main"]
        if name == "big-elementwise":
            assert "T.parallel" in scheduled.script() and "T.vectorized" in scheduled.script()
        _same_results(func, scheduled, target)
        assert FallbackRule().apply(func, target, False) is not None  # the fallback takes them too


def _reduction_ops():
    from tvm import relax

    op = relax.op
    f32 = "float32"
    return [
        ("sum", lambda bb, x: op.sum(x, axis=[2, 3]), [((1, 96, 30, 31), f32)]),
        ("argmax", lambda bb, x: op.argmax(x, axis=1), [((3, 200, 150), f32)]),
        ("softmax", lambda bb, x: op.nn.softmax(x, axis=-1), [((1, 4, 65, 65), f32)]),
        ("layer-norm", lambda bb, x, g, b: op.nn.layer_norm(x, g, b, axes=[-1]),
         [((1, 1200, 96), f32), ((96,), f32), ((96,), f32)]),
        ("matmul", lambda bb, x, w: op.matmul(x, w), [((1, 100, 72), f32), ((72, 130), f32)]),
        ("conv2d-nhwc", lambda bb, x, w: op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="OHWI"),
         [((1, 20, 22, 16), f32), ((24, 3, 3, 16), f32)]),
        ("max-pool", lambda bb, x: op.nn.max_pool2d(x, 3, strides=2, padding=1, layout="NHWC"),
         [((1, 45, 45, 24), f32)]),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _reduction_ops()])
def test_fallback_parallelizes_kernels_with_reductions_and_keeps_their_results(name):
    import tvm

    from omnic.compile.rules.cpu import FallbackRule, InjectiveRule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
    _, body, shapes = next(c for c in _reduction_ops() if c[0] == name)
    for kernel, func in _relax_kernels(body, shapes):
        assert InjectiveRule().apply(func, target, False) is None, f"{name}: {kernel}"
        sch = FallbackRule().apply(func, target, False)
        assert sch is not None
        assert "T.parallel" in sch.mod["main"].script()
        _same_results(func, sch.mod["main"], target)


def _odd_kernels():
    from tvm import relax

    op = relax.op
    f32 = "float32"
    return [
        # dlight's analysis reads a reduction over one element as spatial: inlining the sigmoid
        # into it would apply the sigmoid in its init and again in its update
        ("unit-reduction", lambda bb, x, w: op.sigmoid(bb.emit(op.nn.conv2d(x, w, data_layout="NHWC",
                                                                              kernel_layout="OHWI"))),
         [((1, 1, 1, 1), f32), ((7, 1, 1, 1), f32)]),
        # uneven adaptive windows lower to blocks nested in blocks, which dlight cannot read
        ("adaptive-pool", lambda bb, x: op.nn.adaptive_avg_pool2d(x, (4, 5)), [((1, 96, 90, 110), f32)]),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _odd_kernels()])
def test_odd_kernels_go_to_the_fallback_and_keep_their_results(name):
    import tvm

    from omnic.compile.rules.cpu import FallbackRule, InjectiveRule

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
    _, body, shapes = next(c for c in _odd_kernels() if c[0] == name)
    for _, func in _relax_kernels(body, shapes, fuse=True):
        assert InjectiveRule().apply(func, target, False) is None
        sch = FallbackRule().apply(func, target, False)
        assert sch is not None
        if name == "adaptive-pool":
            assert "T.parallel" in sch.mod["main"].script()
        _same_results(func, sch.mod["main"], target)


def test_a_squeeze_excite_with_one_squeezed_channel_matches_pytorch():
    class SE1(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Conv2d(6, 1, 1), nn.Conv2d(1, 6, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))

    dm = engine.compile(SE1().eval(), "host", torch.randn(1, 6, 9, 7))  # refuses outputs off PyTorch's
    assert dm.report["kernels_unscheduled"] == 0


def test_rules_build_for_a_raspberry_pi():
    """The same rules on an aarch64 target (4 NEON fp32 lanes, 4 cores): every kernel scheduled
    and the build goes through (not run: no such device here)."""
    dm = engine.compile(PadResize(), "rasp4b", torch.randn(1, 3, 13, 11))
    assert dm.report["kernels_unscheduled"] == 0
    found = kernels(dm)
    assert all(p is not None for p, _ in found.values())
    assert any(p == "default:injective" for p, _ in found.values())
