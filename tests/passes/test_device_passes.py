"""Device-driven swaps: applied only where the device row asks for them; approximate ones
report themselves as such and their output change stays bounded."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnic.passes import get_pass
from omnic.core.targets import get_device
from tests.passes.helpers import apply, calls_module, count, spec

SLOW_ACTS = spec(slow_ops={"gelu": "erf", "silu": "exp", "mish": "exp", "sigmoid": "exp"})


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


class Acts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gelu, self.silu, self.mish = nn.GELU(), nn.SiLU(), nn.Mish()

    def forward(self, x):
        y = self.mish(self.silu(self.gelu(self.conv(x))))
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True)) + F.gelu(y)


class ReluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_swap_activations():
    x = torch.randn(1, 3, 8, 8)
    _, new, rep, ref, out = apply(Acts(), x, "swap_activations", SLOW_ACTS)
    assert not rep.exact and len(rep.nodes_changed) == 5
    assert "gelu is slow on test-device" in rep.why
    assert count(new, calls_module((nn.GELU, nn.SiLU, nn.Mish))) == 0
    assert 0 < rel(out, ref) < 0.25  # approximate but bounded
    # with hard-swish itself slow, the next choice (ReLU) is used
    _, new, rep, _, _ = apply(Acts(), x, "swap_activations", spec(slow_ops={"gelu": "erf", "hardswish": "clip"}))
    assert "gelu->relu: 2" in rep.notes and "hardswish->relu" not in " ".join(rep.notes)


def test_swap_activations_leaves_alone():
    x = torch.randn(1, 3, 8, 8)
    _, _, rep, ref, out = apply(Acts(), x, "swap_activations", spec(slow_ops={}))   # nothing slow
    assert not rep.changed and torch.equal(out, ref)
    _, _, rep, ref, out = apply(ReluNet(), x, "swap_activations", SLOW_ACTS)       # nothing to swap
    assert not rep.changed and torch.equal(out, ref)


class Upsampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x):
        return self.up(x) + F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)


class NearestUp(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="nearest")


def test_bilinear_to_nearest():
    x = torch.randn(1, 3, 8, 8)
    device = get_device("rasp4b")  # its row lists resize_bilinear as slow
    _, new, rep, ref, out = apply(Upsampling(), x, "bilinear_to_nearest", device)
    assert not rep.exact and set(rep.nodes_changed) == {"up", "interpolate"}
    modes = [n.kwargs.get("mode") for n in new.graph.nodes if n.target is F.interpolate]
    assert modes == ["nearest", "nearest"]
    assert out.shape == ref.shape and rel(out, ref) < 1.0


def test_bilinear_to_nearest_leaves_alone():
    x = torch.randn(1, 3, 8, 8)
    _, _, rep, ref, out = apply(Upsampling(), x, "bilinear_to_nearest", get_device("host"))
    assert not rep.changed and torch.equal(out, ref)
    _, _, rep, ref, out = apply(NearestUp(), x, "bilinear_to_nearest", get_device("rasp4b"))
    assert not rep.changed and torch.equal(out, ref)


class LargeDW(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, k, padding=k // 2, groups=8)

    def forward(self, x):
        return self.dw(x)


def test_shrink_depthwise():
    x = torch.randn(1, 8, 12, 12)
    model = LargeDW(7)
    with torch.no_grad():  # energy near the centre, as in trained nets
        yy, xx = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
        model.dw.weight.mul_(torch.exp(-((yy - 3) ** 2 + (xx - 3) ** 2) / 2.0))
    _, new, rep, ref, out = apply(model, x, "shrink_depthwise", spec(max_depthwise_kernel=3))
    assert rep.nodes_changed == ("dw",) and not rep.exact
    assert new.get_submodule("dw").kernel_size == (3, 3) and out.shape == ref.shape
    torch.testing.assert_close(new.get_submodule("dw").weight, model.dw.weight[:, :, 2:5, 2:5])
    assert rel(out, ref) < 0.3


def test_shrink_depthwise_leaves_alone():
    x = torch.randn(1, 8, 12, 12)
    _, _, rep, ref, out = apply(LargeDW(3), x, "shrink_depthwise", spec(max_depthwise_kernel=3))
    assert not rep.changed and torch.equal(out, ref)
    _, _, rep, _, _ = apply(LargeDW(7), x, "shrink_depthwise", spec(max_depthwise_kernel=None))
    assert not rep.changed


class ChannelLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        return self.out(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class TokenLN(nn.Module):  # LayerNorm over tokens (transformer): not a CNN channel norm
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):  # (B, N, C)
        return self.norm(x)


def test_layernorm_to_batchnorm():
    x = torch.randn(2, 3, 8, 8)
    device = get_device("S888-gpu")  # has_fast_layernorm=False in the table
    _, new, rep, ref, out = apply(ChannelLN(), x, "layernorm_to_batchnorm", device)
    assert not rep.exact and set(rep.nodes_changed) == {"permute", "norm", "permute_1"}
    assert isinstance(new.get_submodule("norm"), nn.BatchNorm2d)
    assert not any(n.target == "permute" for n in new.graph.nodes)
    # a per-channel fit of a per-position normalisation: close, not equal
    assert 0 < rel(out, ref) < 0.5


def test_layernorm_to_batchnorm_leaves_alone():
    x = torch.randn(2, 3, 8, 8)
    _, _, rep, ref, out = apply(ChannelLN(), x, "layernorm_to_batchnorm", get_device("host"))
    assert not rep.changed and torch.equal(out, ref)
    t = torch.randn(2, 10, 16)
    _, _, rep, ref, out = apply(TokenLN(), t, "layernorm_to_batchnorm", get_device("S888-gpu"))
    assert not rep.changed and torch.equal(out, ref)
