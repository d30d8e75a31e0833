"""Sandwich-rule training on real digits, BN recalibration, fine-tuning."""
from __future__ import annotations

import torch

from omnic import nas
from omnic.examples.digits import accuracy, accuracy_fn
from omnic.search.train import preserved_bn_stats, recalibrate_bn


def test_sandwich_training_on_digits(trained_supernet, digits):
    omni, history = trained_supernet
    train, val = digits
    n = len(history["loss_max"])
    assert n == 2 * len(train)
    first = sum(history["loss_max"][:5]) / 5
    last = sum(history["loss_max"][-5:]) / 5
    assert last < 0.5 * first
    accs = {}
    for label, cfg in (("max", omni.max()), ("min", omni.min())):
        with preserved_bn_stats(omni):
            recalibrate_bn(omni, train, batches=3, cfg=cfg)
            accs[label] = accuracy(omni, val)
    # real accuracy on held-out digits, for the largest and the smallest subnet alike
    assert accs["max"] > 0.85, accs
    assert accs["min"] > 0.6, accs


def test_recalibration_preserves_supernet_statistics(trained_supernet, digits):
    omni, _ = trained_supernet
    bn = omni.model.stem[1]
    before = bn.running_mean.clone()
    with preserved_bn_stats(omni):
        recalibrate_bn(omni, digits[0], batches=2, cfg=omni.min())
        assert not torch.equal(bn.running_mean, before)
    assert torch.equal(bn.running_mean, before)
    omni.set_active(omni.max())


def test_finetune_exported_subnet(trained_supernet, digits):
    omni, _ = trained_supernet
    train, val = digits
    sub = omni.export(omni.min())
    recalibrate_bn(sub, train, batches=3)
    before = accuracy(sub, val)
    nas.finetune(sub, train, epochs=1, lr=0.02)
    assert accuracy(sub, val) >= before - 0.02
    assert accuracy_fn(val)(sub) == accuracy(sub, val)
