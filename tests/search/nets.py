"""Two user-written nets the converter must handle: one with concatenations, one with grouped convs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConcatNet(nn.Module):
    """Inception-style branches joined by torch.cat, a BN over the concatenation, a depthwise conv
    with a residual add over the concatenated channels, and a functional head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.b1 = nn.Conv2d(16, 8, 1, bias=False)
        self.b2 = nn.Conv2d(16, 16, 5, 1, 2, bias=False)
        self.bn_cat = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, 1, 1, groups=24)
        self.fuse = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32 + 16, num_classes)

    def forward(self, x):
        s = F.relu(self.stem_bn(self.stem(x)))
        y = torch.cat([self.b1(s), self.b2(s)], dim=1)
        y = F.relu(self.bn_cat(y))
        y = y + self.dw(y)
        y = F.relu(self.fuse(y))
        pooled = torch.cat([y.mean((2, 3)), F.adaptive_avg_pool2d(s, 1).flatten(1)], 1)
        return self.fc(pooled)


class GroupedNet(nn.Module):
    """ResNeXt-style: grouped 3x3 convs (4 groups) inside residual blocks, a squeeze-excite gate."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[GroupedBlock(width) for _ in range(2)])
        self.se_fc1 = nn.Conv2d(width, 8, 1)
        self.se_fc2 = nn.Conv2d(8, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * gate
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.bn3(self.conv3(y)))
