"""Small models the tests share; the CLI tests load the factories as ``tests.cli_models:NAME``."""
import torch
from torch import nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


class ConvBNNet(nn.Module):
    """conv -> BN -> relu -> global mean -> linear: the smallest net a supernet can be made of."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class MaxPoolNet(nn.Module):
    """A conv then nn.AdaptiveMaxPool2d, which TVM's importers cannot lower."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveMaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x))
