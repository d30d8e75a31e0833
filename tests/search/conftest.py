"""Fixtures of the search tests: one thread for PyTorch (the machine is shared; two threads
contending are several times slower), a fast measurement protocol over a session store."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    from omnic import engine
    from omnic.core.measure import MeasureConfig
    from omnic.oracle import LatencyStore, Oracle

    path = tmp_path_factory.mktemp("search-oracle") / "latency.sqlite"
    return Oracle(LatencyStore(path), MeasureConfig(min_repeat_ms=10, repeats=3, max_rounds=1, time_budget_s=0.1),
                  compile_fn=engine.compile)


@pytest.fixture(scope="session")
def digits():
    from omnic.examples.digits import digits_loaders

    return digits_loaders(size=8, seed=0)


@pytest.fixture(scope="session")
def calib(digits):
    """An unshuffled loader over the training digits: BN recalibration sees the same batches in
    every run, which reproducible (and resumable) searches need."""
    from torch.utils.data import DataLoader

    return DataLoader(digits[0].dataset, batch_size=64, shuffle=False)


@pytest.fixture(scope="session")
def trained_supernet(digits):
    """A DigitsResNet supernet after a short sandwich training (shared by the search tests)."""
    from omnic import nas
    from omnic.examples.digits import DigitsResNet

    torch.manual_seed(0)
    omni = nas.omnimize(DigitsResNet(width=16), example_inputs=torch.randn(1, 1, 8, 8), divisor=4)
    history = nas.train_supernet(omni, digits[0], epochs=2, lr=0.1)
    return omni, history
