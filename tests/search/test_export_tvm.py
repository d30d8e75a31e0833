"""Seeded sweep: random subnets export to plain modules equal to the supernet, and a few small
ones compile with TVM to outputs equal to PyTorch's."""
from __future__ import annotations

import random

import pytest
import torch

from omnic import engine, nas
from omnic.examples.digits import DigitsResNet
from tests.search.nets import ConcatNet, GroupedNet

FACTORIES = {"digits_resnet": lambda: DigitsResNet(width=16), "concat": ConcatNet, "grouped": GroupedNet}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_seeded_sweep_export_equals_supernet(name):
    torch.manual_seed(1)
    model = FACTORIES[name]()
    x = torch.randn(4, 1, 8, 8)
    omni = nas.omnimize(model, example_inputs=x, divisor=4)
    omni.train()
    with torch.no_grad():  # non-trivial BN statistics for every channel
        for _ in range(3):
            omni(torch.randn(8, 1, 8, 8))
    omni.eval()
    rng = random.Random(1234)
    for _ in range(25):
        cfg = omni.sample(rng)
        omni.set_active(cfg)
        with torch.no_grad():
            ref = omni(x)
            out = omni.export(cfg).eval()(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), cfg


@pytest.mark.parametrize("name,seed", [("concat", 3), ("grouped", 5), ("digits_resnet", 7)])
def test_random_subnet_compiles_to_same_outputs(name, seed):
    torch.manual_seed(seed)
    model = FACTORIES[name]()
    x = torch.randn(1, 1, 8, 8)
    omni = nas.omnimize(model, example_inputs=x, divisor=4)
    cfg = omni.sample(random.Random(seed))
    sub = omni.export(cfg).eval()
    dm = engine.compile(sub, {"device": "host"}, x, progress=False)
    assert dm.report["max_rel_error"] < 1e-4
    omni.set_active(cfg)
    omni.eval()  # made from a model in training mode, the supernet is in training mode too
    with torch.no_grad():
        expected = omni(x)
    assert torch.allclose(dm(x), expected, atol=1e-4, rtol=1e-4)
