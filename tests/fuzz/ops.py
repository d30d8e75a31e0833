"""The fuzzer's operators: one small ``nn.Module`` per op kind, built from plain parameters.

Every op takes its parameters as keyword arguments (so a model spec is plain data that prints as
a repro) and never reads a tensor's shape in ``forward`` (shapes are fixed when the spec is drawn,
which keeps each model fx-traceable with static shapes, the way omnic compiles them).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh")
_ACT_FNS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish,
            "hardsigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class Act(nn.Module):
    def __init__(self, *, fn: str):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return _ACT_FNS[self.fn](x)


class Conv(nn.Module):
    """Plain, pointwise, depthwise (groups == in channels) or grouped conv."""

    def __init__(self, *, cin: int, cout: int, k: int, stride: int, dilation: int, padding: int,
                 groups: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(x)


class BatchNorm(nn.Module):
    """Eval-mode BatchNorm with non-trivial running statistics (set from the model seed)."""

    def __init__(self, *, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        with torch.no_grad():
            self.bn.running_mean.normal_(0.0, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0.0, 0.3)

    def forward(self, x):
        return self.bn(x)


class GroupNorm(nn.Module):
    def __init__(self, *, groups: int, c: int):
        super().__init__()
        self.gn = nn.GroupNorm(groups, c)
        with torch.no_grad():
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.normal_(0.0, 0.3)

    def forward(self, x):
        return self.gn(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension (of an image, a sequence or a vector)."""

    def __init__(self, *, d: int, affine: bool):
        super().__init__()
        self.ln = nn.LayerNorm(d, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.ln.weight.uniform_(0.5, 1.5)
                self.ln.bias.normal_(0.0, 0.3)

    def forward(self, x):
        return self.ln(x)


class MaxPool(nn.Module):
    def __init__(self, *, k: int, stride: int, padding: int, ceil: bool):
        super().__init__()
        self.pool = nn.MaxPool2d(k, stride=stride, padding=padding, ceil_mode=ceil)

    def forward(self, x):
        return self.pool(x)


class AvgPool(nn.Module):
    def __init__(self, *, k: int, stride: int, padding: int, ceil: bool, count_pad: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(k, stride=stride, padding=padding, ceil_mode=ceil,
                                 count_include_pad=count_pad)

    def forward(self, x):
        return self.pool(x)


class AdaptiveAvgPool(nn.Module):
    def __init__(self, *, oh: int, ow: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((oh, ow))

    def forward(self, x):
        return self.pool(x)


class Upsample(nn.Module):
    def __init__(self, *, mode: str, oh: int, ow: int, align: bool):
        super().__init__()
        self.mode, self.size = mode, (oh, ow)
        self.align = align if mode == "bilinear" else None

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode=self.mode, align_corners=self.align)


class SqueezeExcite(nn.Module):
    """SE gating: x * gate(conv(relu(conv(mean(x))))), the MobileNetV3 block."""

    def __init__(self, *, c: int, r: int, gate: str):
        super().__init__()
        self.down, self.up, self.gate = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1), gate

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * _ACT_FNS[self.gate](self.up(F.relu(self.down(s))))


class TransposeHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 1, 3, 2)


class Reshape(nn.Module):
    """A reshape to a fixed shape (the same elements, another layout)."""

    def __init__(self, *, shape: tuple):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(self.shape)


class SplitPick(nn.Module):
    """Split the channels (dim 1) into two parts and keep one."""

    def __init__(self, *, first: int, total: int, pick: int):
        super().__init__()
        self.sizes, self.pick = [first, total - first], pick

    def forward(self, x):
        return torch.split(x, self.sizes, dim=1)[self.pick]


class ImageToSeq(nn.Module):
    """(N, C, H, W) -> (N, H*W, C), the ViT token layout."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class SeqToImage(nn.Module):
    """(N, L, D) -> (N, D, h, w) with h * w == L."""

    def __init__(self, *, d: int, h: int, w: int):
        super().__init__()
        self.shape = (1, d, h, w)

    def forward(self, x):
        return x.transpose(1, 2).reshape(self.shape)


class GlobalPoolFlatten(nn.Module):
    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class Flatten(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


class SeqMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


class Linear(nn.Module):
    def __init__(self, *, din: int, dout: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(din, dout, bias=bias)

    def forward(self, x):
        return self.fc(x)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


class SelfMatmul(nn.Module):
    """x @ x^T scaled: the attention-score pattern (N, L, D) -> (N, L, L)."""

    def __init__(self, *, d: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, x):
        return torch.matmul(x, x.transpose(-1, -2)) * self.scale


class Attention(nn.Module):
    """Multi-head self-attention written out: qkv projection, head split, softmax(q k^T / sqrt(d)) v.

    ``impl`` picks the core: ``manual`` (matmul + softmax), ``sdpa`` (F.scaled_dot_product_attention)
    or ``mha`` (nn.MultiheadAttention).
    """

    def __init__(self, *, d: int, heads: int, impl: str):
        super().__init__()
        self.d, self.heads, self.impl = d, heads, impl
        if impl == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        if self.impl == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        hd = self.d // self.heads
        q, k, v = self.qkv(x).reshape(1, -1, 3, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd), dim=-1), v)
        return self.proj(o.transpose(1, 2).reshape(1, -1, self.d))


class Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Mul(nn.Module):
    def forward(self, a, b):
        return a * b


class Concat(nn.Module):
    def __init__(self, *, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, a, b):
        return torch.cat([a, b], dim=self.dim)


#: op name -> module class. The name is what the coverage table counts.
OPS = {
    "act": Act, "conv": Conv, "batchnorm": BatchNorm, "groupnorm": GroupNorm, "layernorm": LayerNorm,
    "maxpool": MaxPool, "avgpool": AvgPool, "adaptive_avgpool": AdaptiveAvgPool, "upsample": Upsample,
    "se": SqueezeExcite, "transpose_hw": TransposeHW, "reshape": Reshape, "split": SplitPick,
    "image_to_seq": ImageToSeq, "seq_to_image": SeqToImage, "global_pool": GlobalPoolFlatten,
    "flatten": Flatten, "seq_mean": SeqMean, "linear": Linear, "softmax": Softmax,
    "self_matmul": SelfMatmul, "attention": Attention, "add": Add, "mul": Mul, "concat": Concat,
}
