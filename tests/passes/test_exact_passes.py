"""Exact passes: each rewrites its pattern with outputs equal, leaves other models alone,
and never mutates its input (checked inside ``apply``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnic.core.errors import UnsupportedOperatorError
from omnic.passes import get_pass
from tests.passes.helpers import apply, calls_module, count, spec

HOST16 = spec(channel_multiple=16)


def _calibrated(model: nn.Module, shape) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *shape[1:]))
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.bn1d(self.fc(y.mean((2, 3))))


class BNAfterAdd(nn.Module):  # BN fed by an add: nothing to fold into
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x) + x)


def test_fold_batchnorm():
    x = torch.randn(2, 3, 8, 8)
    _, new, rep, ref, out = apply(_calibrated(ConvBN(), x.shape), x, "fold_batchnorm", HOST16)
    assert rep.exact and set(rep.nodes_changed) == {"bn", "bn1d"}
    assert count(new, calls_module(nn.modules.batchnorm._BatchNorm)) == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_alone():
    x = torch.randn(2, 3, 8, 8)
    _, new, rep, ref, out = apply(_calibrated(BNAfterAdd(), x.shape), x, "fold_batchnorm", HOST16)
    assert not rep.changed and count(new, calls_module(nn.BatchNorm2d)) == 1
    assert torch.equal(out, ref)


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):  # x: (2, 6)
        y = self.ident(self.drop(x)).reshape(x.shape[0] * 1, 6).contiguous()
        y = F.dropout(y, 0.1, training=False).permute(0, 1) * 1
        return self.fc(y.transpose(1, 1) + 0).view(2, 6)


class RealReshapes(nn.Module):
    def forward(self, x):  # every op changes shape or values
        return (x.reshape(3, 4).permute(1, 0) * 2).flatten()


def test_remove_noops():
    x = torch.randn(2, 6)
    _, new, rep, ref, out = apply(Noops(), x, "remove_noops", HOST16)
    assert len(rep.nodes_changed) == 10  # the Python-int `* 1` in the shape arithmetic stays
    assert [n.op for n in new.graph.nodes] == ["placeholder", "call_module", "output"]
    assert torch.equal(out, ref)


def test_remove_noops_leaves_alone():
    x = torch.randn(2, 6)
    _, _, rep, ref, out = apply(RealReshapes(), x, "remove_noops", HOST16)
    assert not rep.changed and torch.equal(out, ref)


class ScaleChains(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x):
        y = (self.conv(x) * 0.5 + 1.0) * 2.0 - 3.0   # folds into the conv
        z = torch.sigmoid(x) * 3.0 / 2.0 + 1.0 + 2.0    # 4 ops -> mul + add
        return y.sum() + z.sum()


class SharedScale(nn.Module):  # conv output used twice; a single scalar op
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).reshape(x.shape[0] * 2 * 3 // 6, 4, -1)  # int shape arithmetic: not touched
        return y * 2.0 + y.sum()


def test_fuse_pointwise():
    x = torch.randn(1, 3, 8, 8)
    _, new, rep, ref, out = apply(ScaleChains(), x, "fuse_pointwise", HOST16)
    assert len(rep.nodes_changed) == 8
    arith = [n for n in new.graph.nodes if n.op == "call_function" and n.target.__name__ in ("mul", "add", "sub", "truediv")]
    assert len(arith) == 2 + 1  # one mul + one add for z, and the final y.sum() + z.sum()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_fuse_pointwise_leaves_alone():
    x = torch.randn(1, 3, 8, 8)
    _, _, rep, ref, out = apply(SharedScale(), x, "fuse_pointwise", HOST16)
    assert not rep.changed and torch.equal(out, ref)


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.p2 = nn.AdaptiveAvgPool2d((2, 4))

    def forward(self, x):  # x: (1, 3, 8, 8)
        return self.gap(x).flatten(1).sum(1) + self.p2(x).sum((1, 2, 3)) + F.adaptive_avg_pool2d(x, 1).sum()


class UnequalPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(3)  # 8 is not a multiple of 3

    def forward(self, x):
        return self.pool(x)


def test_adaptive_pool_to_mean():
    x = torch.randn(1, 3, 8, 8)
    _, new, rep, ref, out = apply(Pools(), x, "adaptive_pool_to_mean", HOST16)
    assert len(rep.nodes_changed) == 3
    assert count(new, calls_module(nn.AdaptiveAvgPool2d)) == 0
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_adaptive_pool_to_mean_leaves_alone():
    x = torch.randn(1, 3, 8, 8)
    _, _, rep, ref, out = apply(UnequalPool(), x, "adaptive_pool_to_mean", HOST16)
    assert not rep.changed and "unequal" in rep.notes[0] and torch.equal(out, ref)


class SEBlock(nn.Module):
    """expand conv (12 ch) -> BN -> hardswish -> depthwise -> SE gate -> project; residual add (6 ch)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.expand = nn.Conv2d(6, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc1 = nn.Conv2d(12, 5, 1)
        self.fc2 = nn.Conv2d(5, 12, 1)
        self.project = nn.Conv2d(12, 6, 1)
        self.head = nn.Conv2d(6, 16, 1)

    def forward(self, x):
        s = self.stem(x)
        y = F.hardswish(self.dw(F.hardswish(self.bn(self.expand(s)))))
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(s + self.project(y * gate))


class FlattenHead(nn.Module):  # 12 channels flow into a flatten + linear: cannot pad
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.fc = nn.Linear(12 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_pad_channels():
    x = torch.randn(1, 3, 8, 8)
    model = _calibrated(SEBlock(), x.shape)
    _, new, rep, ref, out = apply(model, x, "pad_channels", spec(channel_multiple=8))
    assert rep.exact and rep.changed
    widths = {name: m.out_channels for name, m in new.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths == {"stem": 8, "expand": 16, "dw": 16, "fc1": 8, "fc2": 16, "project": 8, "head": 16}
    assert new.get_submodule("bn").num_features == 16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pad_channels_leaves_alone():
    x = torch.randn(1, 3, 8, 8)
    _, new, rep, ref, out = apply(FlattenHead(), x, "pad_channels", spec(channel_multiple=8))
    assert not rep.changed and "flatten" in rep.notes[0]
    assert torch.equal(out, ref)
    # a device with no preferred multiple: nothing to do
    _, _, rep, _, _ = apply(SEBlock(), x, "pad_channels", spec(channel_multiple=1))
    assert not rep.changed


class MaxPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.gmp = nn.AdaptiveMaxPool2d(1)
        self.mp2 = nn.AdaptiveMaxPool2d(2)

    def forward(self, x):  # (1, 3, 8, 8)
        return self.gmp(x).flatten(1) + self.mp2(x).amax((2, 3)) + F.adaptive_max_pool2d(x, 4).sum((2, 3))


def test_legalize_unsupported():
    x = torch.randn(1, 3, 8, 8)
    _, new, rep, ref, out = apply(MaxPools(), x, "legalize_unsupported", HOST16)
    assert set(rep.nodes_changed) == {"gmp", "mp2", "adaptive_max_pool2d"}
    assert count(new, calls_module(nn.AdaptiveMaxPool2d)) == 0
    assert torch.equal(out, ref)


def test_legalize_unsupported_leaves_alone_or_names_the_op():
    x = torch.randn(1, 3, 8, 8)
    _, _, rep, ref, out = apply(UnequalPool(), x, "legalize_unsupported", HOST16)
    assert not rep.changed and torch.equal(out, ref)
    from omnic.core import ir

    gm = ir.trace(nn.Sequential(nn.AdaptiveMaxPool2d(3)), x).gm
    with pytest.raises(UnsupportedOperatorError, match=r"adaptive_max_pool2d.*8x8 -> output 3x3"):
        get_pass("legalize_unsupported").fn(gm, HOST16)
    # a device's own unsupported_ops are named too
    gm = ir.trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GELU()), x).gm
    with pytest.raises(UnsupportedOperatorError, match="gelu.*no erf"):
        get_pass("legalize_unsupported").fn(gm, spec(unsupported_ops={"gelu": "no erf"}))
