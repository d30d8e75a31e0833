"""Real images, offline: scikit-learn's ``digits`` (1797 8x8 handwritten digits), resized.

Used by the tests, examples and benchmarks so that accuracy numbers are real.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(size: int = 16, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(N, channels, size, size)`` float images (standardised) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x, torch.tensor(d.target, dtype=torch.long)


def digits_loaders(size: int = 16, channels: int = 1, batch_size: int = 64, val_fraction: float = 0.25,
                   seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders over a seeded split of digits."""
    x, y = digits_tensors(size, channels)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_val = int(len(x) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=256, shuffle=False)
    return train_loader, val_loader


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode, restored afterwards) on ``loader``."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(1, total)


def accuracy_fn(loader: DataLoader) -> Callable[[nn.Module], float]:
    """A ``score_fn`` for :func:`omnic.nas.search`: accuracy on ``loader``."""
    return lambda model: accuracy(model, loader)


def train_plain(model: nn.Module, loader: DataLoader, *, epochs: int = 3, lr: float = 0.01, seed: int = 0
                ) -> nn.Module:
    """A plain SGD training loop (for the tests' and benchmarks' base models)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


class DigitsResNet(nn.Module):
    """A small residual CNN for digits (tests, examples, benchmarks): a stem, two stages of
    residual blocks (the second downsampling), global pooling and a classifier."""

    def __init__(self, width: int = 16, blocks: tuple[int, int] = (2, 2), in_channels: int = 1,
                 num_classes: int = 10):
        super().__init__()
        from omnic.examples.zoo import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks[0])])
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2),
                                    *[BasicBlock(2 * width, 2 * width) for _ in range(blocks[1] - 1)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsCNN(nn.Module):
    """A plain small CNN (no residuals): the FastNAS example of a trained model to prune."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64), in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, a, 3, 1, 1, bias=False), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
            nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
