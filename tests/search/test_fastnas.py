"""FastNAS: importance sorting keeps outputs, pruning meets a measured budget, the sensitivity
map is reused for a second budget, an infeasible budget reports the smallest latency."""
from __future__ import annotations

import pytest
import torch

from omnic import nas
from omnic.core.errors import InfeasibleConstraintError
from omnic.examples.digits import DigitsCNN, DigitsResNet, accuracy, accuracy_fn, train_plain
from tests.search.nets import ConcatNet


@pytest.fixture(scope="module")
def trained_cnn(digits):
    torch.manual_seed(0)
    model = DigitsCNN(widths=(32, 64, 64))
    train_plain(model, digits[0], epochs=2, lr=0.05)
    return model


@pytest.mark.parametrize("factory", [DigitsResNet, ConcatNet, lambda: DigitsCNN((32, 64, 64))],
                         ids=["resnet", "concat", "cnn"])
def test_channel_sorting_keeps_full_width_outputs(factory):
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # distinct BN scales, so the sort really permutes
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(3, 1, 8, 8)
    omni = nas.omnimize(model, mode="fastnas", example_inputs=x, divisor=4)
    assert any(p != sorted(p) for p in omni.channel_permutation.values())
    assert {c.kind for c in omni.space} == {"width"}
    with torch.no_grad():
        assert torch.allclose(omni(x), model(x), atol=1e-5)
    # every width keeps the most important channels: BN scales are now descending
    for name, m in omni.elastic_modules().items():
        if isinstance(m, torch.nn.BatchNorm2d) and len(m.out_segments) == 1 and m.out_segments[0][0]:
            w = m.weight.detach().abs()
            if len(omni.groups[m.out_segments[0][0]]["modules"]) == 2:  # conv + this BN only
                assert torch.all(w[:-1] >= w[1:]), name


def test_fastnas_widths_follow_channel_multiple(trained_cnn):
    omni = nas.omnimize(trained_cnn, mode="fastnas", example_inputs=torch.randn(1, 1, 8, 8),
                        deployment={"device": "host"})
    mult = 16  # host's channel_multiple
    assert all(v % mult == 0 for c in omni.space for v in c.values)
    assert omni.space["width:features.3"].values == (16, 32, 48, 64)


def test_fastnas_search_meets_budget_and_reuses_sensitivity(trained_cnn, digits, calib, oracle, tmp_path):
    train, val = digits
    omni = nas.omnimize(trained_cnn, mode="fastnas", example_inputs=torch.randn(1, 1, 8, 8), divisor=8)
    full_lat = oracle.measure(trained_cnn, "host", torch.randn(1, 1, 8, 8)).median_ms
    small_cfg = omni.min()
    min_lat = oracle.measure(omni.export(small_cfg).eval(), "host", omni.example_input(small_cfg)).median_ms
    # default-scheduled kernels of an 8x8 net cost little more at full width than at the minimum
    # (per-call work dominates), so the middle of that range already prunes hard: ask for 0.7
    budget = min_lat + 0.7 * (full_lat - min_lat)
    score = accuracy_fn(val)
    r1 = nas.search(omni, {"latency": budget}, "host", score, oracle=oracle, calib_loader=calib,
                    checkpoint_dir=tmp_path, calib_batches=3)
    assert r1.mode == "fastnas" and not r1.info["sensitivity_reused"]
    assert r1.latency_ms <= budget
    assert oracle.lookup(r1.model, "host", torch.randn(1, 1, 8, 8)).median_ms == r1.latency_ms
    assert r1.scores["full"] > 0.85
    assert r1.score > 0.3
    # fine-tuning recovers accuracy and records before/after
    nas.finetune(r1, train, epochs=1, lr=0.02, score_fn=score)
    assert r1.scores["after_finetune"] >= r1.scores["before_finetune"] - 0.02
    assert r1.scores["after_finetune"] > 0.8
    # a second budget: the sensitivity map is reused, only measurements remain
    budget2 = min_lat + 0.2 * (full_lat - min_lat)
    r2 = nas.search(omni, {"latency": budget2}, "host", score, oracle=oracle, calib_loader=calib,
                    checkpoint_dir=tmp_path, calib_batches=3)
    assert r2.info["sensitivity_reused"]
    assert r2.latency_ms <= budget2
    assert r2.info["sensitivity_s"] < r1.info["sensitivity_s"]
    assert r2.cost["flops"] <= r1.cost["flops"] or r2.latency_ms <= r1.latency_ms
    # an impossible budget reports the smallest latency it measured
    with pytest.raises(InfeasibleConstraintError) as info:
        nas.search(omni, {"latency": min_lat / 50}, "host", score, oracle=oracle, calib_loader=calib,
                   checkpoint_dir=tmp_path, calib_batches=3)
    assert info.value.best_latency_ms == pytest.approx(min_lat)
