"""A small model zoo (no torchvision): the architectures the tests and benchmarks use.

All models are fx-traceable. :func:`calibrate_bn` gives BatchNorm layers non-trivial running
statistics, because default-initialised BN hides folding bugs and produces denormal activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


# ----------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks (torchvision's layout, so weights and shapes line up)."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 in_channels: int = 3, stem: str = "imagenet"):
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:  # small inputs (digits, CIFAR): 3x3 stem, no pooling
            self.conv1 = nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        cin = w0
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def resnet_small(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """A ResNet-10-style net for small inputs (32x32): 3 stages of 1 or 2 blocks."""
    return ResNet((1, 2, 2), (16, 32, 64), num_classes, in_channels=in_channels, stem="small")


# ------------------------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int,
                 act: type[nn.Module] = nn.ReLU6, kernel: int = 3, se: bool = False):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=act))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, _make_divisible(hidden // 4)))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``kernel`` (depthwise kernel size) and ``depths`` (blocks per stage, default
    1, 2, 3, 4, 3, 3, 1) make the kernel- and depth-variants a search space explores."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 kernel: int = 3, depths: tuple[int, ...] | None = None):
        super().__init__()
        setting = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                   (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        if depths is not None:
            if len(depths) != len(setting) or min(depths) < 1:
                raise ValueError(f"depths needs {len(setting)} block counts >= 1, got {depths}")
            setting = [(t, c, n, s) for (t, c, _, s), n in zip(setting, depths)]
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in setting:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, kernel=kernel))
                cin = cout
        features.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult)


# ------------------------------------------------------------------------------------ MobileNetV3
class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small layout: hard-swish, squeeze-excite, 3x3 and 5x5 depthwise convs."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        # kernel, expand (hidden), out, se, act, stride
        cfg = [(3, 16, 16, True, nn.ReLU, 2), (3, 72, 24, False, nn.ReLU, 2),
               (3, 88, 24, False, nn.ReLU, 1), (5, 96, 40, True, nn.Hardswish, 2),
               (5, 240, 40, True, nn.Hardswish, 1), (5, 240, 40, True, nn.Hardswish, 1),
               (5, 120, 48, True, nn.Hardswish, 1), (5, 144, 48, True, nn.Hardswish, 1),
               (5, 288, 96, True, nn.Hardswish, 2), (5, 576, 96, True, nn.Hardswish, 1),
               (5, 576, 96, True, nn.Hardswish, 1)]
        cin = _make_divisible(16 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 2, act=nn.Hardswish)]
        for k, hidden, cout, se, act, s in cfg:
            cout = _make_divisible(cout * width_mult)
            hidden = _make_divisible(hidden * width_mult)
            layers.append(InvertedResidual(cin, cout, s, hidden / cin, act=act, kernel=k, se=se))
            cin = cout
        last = 6 * cin
        layers.append(ConvBNAct(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes, width_mult=width_mult)


# ---------------------------------------------------------------------------- conv + attention net
class Attention(nn.Module):
    """Multi-head self-attention written with matmuls (no fused SDPA), over flattened positions."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvAttentionNet(nn.Module):
    """A small hybrid: conv stem (BN, GELU), a LayerNorm-over-channels conv stage, then
    transformer blocks on the flattened feature map (LayerNorm, GELU, matmul attention)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dim: int = 64, depth: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                                  nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.norm_c = nn.LayerNorm(dim)
        self.dw = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        # LayerNorm over channels of an NCHW map (the ConvNeXt idiom)
        x = self.norm_c(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + F.gelu(self.dw(x))
        x = torch.flatten(x, 2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def conv_attention_net(num_classes: int = 10, dim: int = 64, depth: int = 2) -> ConvAttentionNet:
    return ConvAttentionNet(num_classes, dim=dim, depth=depth)


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    test_shape: tuple[int, ...]
    description: str


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry(name="resnet18", factory=resnet18, input_shape=(1, 3, 224, 224), test_shape=(1, 3, 64, 64),
             description="ResNet-18 (ImageNet layout)"),
    ZooEntry(name="resnet_small", factory=resnet_small, input_shape=(1, 3, 32, 32), test_shape=(1, 3, 32, 32),
             description="ResNet-10-style for 32x32 inputs"),
    ZooEntry(name="mobilenet_v2", factory=mobilenet_v2, input_shape=(1, 3, 224, 224), test_shape=(1, 3, 64, 64),
             description="MobileNetV2 1.0"),
    ZooEntry(name="mobilenet_v3_small", factory=mobilenet_v3_small, input_shape=(1, 3, 224, 224),
             test_shape=(1, 3, 64, 64), description="MobileNetV3-Small style (hard-swish, SE)"),
    ZooEntry(name="conv_attention", factory=conv_attention_net, input_shape=(1, 3, 64, 64),
             test_shape=(1, 3, 32, 32), description="conv stem + LayerNorm/GELU/matmul attention"),
)}


def calibrate_bn(model: nn.Module, input_shape: tuple[int, ...], *, batches: int = 2, seed: int = 0) -> nn.Module:
    """Run a few training-mode forward passes on random data so BN statistics are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    shape = (max(4, input_shape[0]),) + tuple(input_shape[1:])
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(shape, generator=gen))
    return model.eval()


def get_model(name: str, *, seed: int = 0, calibrate: bool = True, input_shape: tuple[int, ...] | None = None
              ) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model in eval mode (seeded, BN calibrated) and an example input.

    Raises:
        KeyError: Unknown name (the message lists the zoo).
        InputShapeError: ``input_shape`` is one the model cannot take (the message says why).
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has: {', '.join(ZOO)}")
    entry = ZOO[name]
    shape = tuple(input_shape or entry.input_shape)
    torch.manual_seed(seed)
    model = entry.factory()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    if calibrate:
        try:
            calibrate_bn(model, shape, seed=seed)
        except Exception:
            # a shape the model cannot take (`--input-shape 1,3`): tracing it fails the same way and
            # says why in one line (InputShapeError); any other failure is re-raised as it was
            from omnic.core.ir import trace

            trace(model.eval(), x)
            raise
    model.eval()
    return model, x
