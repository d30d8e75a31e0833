"""Real images, offline: scikit-learn's ``digits`` (1797 8x8 handwritten digits), resized.

Used by the tests, examples and benchmarks so that accuracy numbers are real: the NAS flow
(:func:`digits_loaders`, :class:`DigitsResNet`, :class:`DigitsCNN`) and the precision checks
(:func:`digits_data`, :class:`DigitsMobileCNN`: int8 vs fp32 on a model that has actually learnt
something, since random weights hide quantization damage). Both use one loader and one seeded split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(size: int = 16, channels: int = 1, *, standardize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(N, channels, size, size)`` float images and labels.

    Args:
        size: Side of the images (bilinear resize of the 8x8 originals).
        channels: The gray channel repeated this many times.
        standardize: Roughly zero mean and unit variance (else values in [0, 1]).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if standardize:
        x = (x - 0.3) / 0.35
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x, torch.tensor(d.target, dtype=torch.long)


def _split(n: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (held out, training) of a seeded random split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(n * held_out)
    return perm[:n_held], perm[n_held:]


def digits_loaders(size: int = 16, channels: int = 1, batch_size: int = 64, val_fraction: float = 0.25,
                   seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders over a seeded split of the standardised digits."""
    x, y = digits_tensors(size, channels)
    val, train = _split(len(x), val_fraction, seed)
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=256, shuffle=False)
    return train_loader, val_loader


@dataclass(frozen=True, kw_only=True)
class DigitsData:
    """Train/test split of the digits, as ``[N, 1, size, size]`` float tensors in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """The digits in [0, 1] (not standardised: the int8 checks calibrate on raw pixel ranges),
    with the same seeded split as :func:`digits_loaders`."""
    x, y = digits_tensors(size, standardize=False)
    test, train = _split(len(y), test_fraction, seed)
    return DigitsData(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


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


def evaluate(fn, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """Top-1 accuracy of ``fn`` (a model or a compiled DeviceModel) on ``x``, in batches of ``batch``
    (a DeviceModel needs its compiled batch size; a trailing partial batch is left out)."""
    batch = batch or len(y)
    correct = total = 0
    with torch.no_grad():
        for i in range(0, len(y) - batch + 1, batch):
            pred = fn(x[i:i + batch]).argmax(1)
            correct += int((pred == y[i:i + batch]).sum())
            total += batch
    return correct / max(total, 1)


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


class DigitsMobileCNN(nn.Module):
    """conv-bn-act x4 (one depthwise-separable pair), global mean, linear: the layer kinds of the
    zoo's mobile networks at toy size (ReLU6, Hardswish), for the int8 accuracy checks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.Hardswish(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_digits_cnn(data: DigitsData, *, epochs: int = 6, lr: float = 5e-3, seed: int = 0) -> nn.Module:
    """Train :class:`DigitsMobileCNN` with Adam and a cosine learning rate (seconds per epoch);
    returns it in eval mode.

    Trains on one thread: on a shared 2-core machine, two threads on tiny tensors are slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = DigitsMobileCNN()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        n, batch = len(data.y_train), 32
        steps, step = epochs * math.ceil(n / batch), 0
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(n)
            for i in range(0, n, batch):
                # cosine decay: the last epochs settle BN statistics and weights (stable accuracy)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                idx = perm[i:i + batch]
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    return model.eval()
