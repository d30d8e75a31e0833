"""omnic.compile.legalize: the two miscompilations the differential fuzzer found, each compiled on
host (real TVM builds) and compared with PyTorch, plus the rewrites on their own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import omnic
from omnic import engine
from omnic.compile import legalize

TOLERANCE = 1e-4  # fp32


def _assert_matches(model: nn.Module, x: torch.Tensor) -> None:
    """Compile ``model`` on host and compare every output with eager PyTorch, on the example input
    and on a second one (so nothing folded from the example passes for a correct kernel)."""
    model = model.eval()
    dm = engine.compile(model, "host", x, progress=False)
    for inp in (x, torch.randn_like(x)):
        with torch.no_grad():
            expected = model(inp)
        got = dm(inp)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert tuple(g.shape) == tuple(e.shape)
            rel = float((g - e).abs().max() / e.abs().max().clamp_min(1e-3))
            assert rel <= TOLERANCE, f"max rel error {rel}"


class _Resizes(nn.Module):
    """One input resized (nearest) to several sizes, one output each, so one build checks them all."""

    def __init__(self, sizes, mode="nearest"):
        super().__init__()
        self.sizes, self.mode = sizes, mode

    def forward(self, x):
        return tuple(F.interpolate(x, size=s, mode=self.mode) for s in self.sizes)


@pytest.mark.parametrize("shape, sizes", [
    ((1, 4, 13, 17), [(12, 16), (5, 7), (29, 40), (13, 34), (26, 17)]),   # down, up, mixed, one axis whole
    ((2, 3, 7, 9), [(10, 4), (3, 20), (1, 1), (8, 10)]),
])
def test_nearest_resize_to_non_multiple_sizes_matches_pytorch(shape, sizes):
    """Red before the fix: half-pixel + round picks other source pixels than PyTorch's floor."""
    _assert_matches(_Resizes(sizes), torch.randn(*shape))


def test_upsample_module_and_nearest_exact_match_pytorch():
    """nn.Upsample(mode="nearest") to a non-multiple size, and ``nearest-exact`` (exported as index
    arithmetic, not resize2d) in the same build."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(size=(11, 23), mode="nearest")

        def forward(self, x):
            return self.up(x), F.interpolate(x, size=(9, 5), mode="nearest-exact")

    _assert_matches(M(), torch.randn(1, 2, 6, 7))


def test_nearest_fractional_scale_factor_matches_pytorch():
    """Red before omnic.compile.converters handled it: PyTorch maps dst -> floor(dst / scale), not
    floor(dst * in / out), and the importer keeps only the rounded output size."""
    class M(nn.Module):
        def forward(self, x):
            return (F.interpolate(x, scale_factor=1.3, mode="nearest"),
                    F.interpolate(x, scale_factor=(0.7, 2.5), mode="nearest"),
                    F.interpolate(x, scale_factor=1.5, mode="nearest"))

    _assert_matches(M(), torch.randn(1, 2, 8, 6))


def test_nearest_whole_scale_factor_matches_pytorch():
    class M(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=(3, 1))

    _assert_matches(M(), torch.randn(1, 2, 8, 6))


def test_nearest_1d_matches_pytorch():
    """1-d nearest is exported as index arithmetic (no resize2d); checked so the rewrite stays 2-d."""
    class M(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=11, mode="nearest"), F.interpolate(x, size=3, mode="nearest")

    _assert_matches(M(), torch.randn(1, 3, 5))


def test_nearest_3d_is_right_or_refused():
    """3-d nearest: TVM's importer cannot broadcast the index tensors torch.export gives it
    (aten.index.Tensor), so the build is refused with a typed error - never a wrong answer."""
    class M(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(5, 6, 7), mode="nearest")

    try:
        _assert_matches(M(), torch.randn(1, 2, 3, 4, 5))
    except omnic.OmnicError as exc:
        assert "index" in str(exc)


@pytest.mark.parametrize("batch_first, heads", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_multihead_attention_compiles_and_matches_pytorch(batch_first, heads):
    """Red before the fix: CompileError 'preparing the model for host failed: ... std::bad_alloc'
    (ConvertLayout on the packed in-projection's squeeze(axis=[-2]))."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, heads, batch_first=batch_first)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    _assert_matches(M(), torch.randn(*((2, 5, 8) if batch_first else (5, 2, 8))))


# ---------------------------------------------------------------------- the rewrites themselves
def _module(build):
    """A one-function module ``main(x: 1x4x13x17)`` whose body is ``build(bb, x)``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 13, 17), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod, name):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == name else None)
    return found


def test_only_the_torch_importers_nearest_signature_is_rewritten():
    """half_pixel + 'round' (torch importer) -> asymmetric + floor; an ONNX-style resize
    (round_prefer_floor) and a bilinear one keep their attributes."""
    from tvm import relax

    def build(bb, x):
        a = bb.emit(relax.op.image.resize2d(x, (12, 16), method="nearest_neighbor"))
        b = bb.emit(relax.op.image.resize2d(a, (12, 16), method="nearest_neighbor",
                                            rounding_method="round_prefer_floor"))
        return bb.emit(relax.op.image.resize2d(b, (12, 16), method="linear"))

    out = legalize.nearest_resize_asymmetric(_module(build))
    modes = [(str(c.attrs.method), str(c.attrs.coordinate_transformation_mode), str(c.attrs.rounding_method))
             for c in _calls(out, "relax.image.resize2d")]
    assert sorted(modes) == sorted([("nearest_neighbor", "asymmetric", "floor"),
                                    ("nearest_neighbor", "half_pixel", "round_prefer_floor"),
                                    ("linear", "half_pixel", "round")])


def test_negative_squeeze_axes_are_made_non_negative():
    from tvm import relax

    def build(bb, x):
        e = bb.emit(relax.op.expand_dims(x, [-2]))
        s = bb.emit(relax.op.squeeze(e, [-2, 0]))
        return bb.emit(relax.op.squeeze(bb.emit(relax.op.expand_dims(s, [0])), [0]))

    out = legalize.squeeze_axes_non_negative(_module(build))
    assert [[int(a) for a in c.attrs.axis] for c in _calls(out, "relax.squeeze")] == [[3, 0], [0]]  # a non-negative one is kept
    assert tuple(int(v) for v in out["main"].ret_ty.shape) == (4, 13, 17)
