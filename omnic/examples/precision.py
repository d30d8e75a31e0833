"""A small CNN trained on scikit-learn's digits (8x8 upsampled to 16x16) in a few seconds.

Used by the tests and ``benchmarks/bench_precision.py`` to report int8 vs fp32 accuracy on a
model that has actually learnt something (random weights hide quantization damage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DigitsData:
    """Train/test split of the digits, as ``[N, 1, size, size]`` float tensors in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_data(size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> DigitsData:
    """scikit-learn's 1797 digits, upsampled bilinearly to ``size`` x ``size``, split at random."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return DigitsData(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


class DigitsCNN(nn.Module):
    """conv-bn-relu x3 (one depthwise-separable), global pool, linear: the layer kinds of
    the zoo's mobile networks at toy size."""

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
    """Train :class:`DigitsCNN` with Adam and a cosine learning rate (about 1.5 s per epoch on
    one busy core; about 97 % test accuracy); returns it in eval mode.

    Trains on one thread: on a shared 2-core machine, two threads on tiny tensors are slower.
    """
    import math

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = DigitsCNN()
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
