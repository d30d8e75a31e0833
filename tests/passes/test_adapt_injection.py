"""``omnic.passes.adapt.adapt`` with the oracle and compiler injected: stubs stand in for TVM, so
the keep/reject logic and the wiring are checked in a fraction of a second."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from omnic.core.ir import TracedModel
from omnic.core.measure import Measurement
from omnic.passes.adapt import adapt


def _cost(gm) -> float:
    """Stub latency: one millisecond per graph node, so removing nodes is measurably faster."""
    return float(len(gm.graph.nodes))


class StubOracle:
    def __init__(self):
        self.calls = 0

    def measure(self, model, deployment, example_inputs=None, *, config=None) -> Measurement:
        self.calls += 1
        gm = model.gm if isinstance(model, TracedModel) else model
        return Measurement(median_ms=_cost(gm), runs=1, results_ms=(_cost(gm),))


class StubCompiled:
    def __init__(self, traced: TracedModel):
        self.ms = _cost(traced.gm)

    def measure(self, config) -> Measurement:
        return Measurement(median_ms=self.ms, runs=1, results_ms=(self.ms,))


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(), nn.ReLU()).eval()


def test_injected_oracle_and_compiler_decide_what_is_kept():
    oracle, compiled = StubOracle(), []

    def compile_fn(traced, deployment):
        compiled.append(traced)
        return StubCompiled(traced)

    x = torch.randn(1, 3, 10, 10)
    adapted = adapt(_model(), "host", x, oracle=oracle, compile_fn=compile_fn,
                    passes=("fold_batchnorm", "remove_noops", "pad_channels"))
    report = adapted.adapt_report
    assert report.kept == ["fold_batchnorm", "remove_noops"]
    assert [s.status.split(" ")[0] for s in report.steps] == ["kept", "kept", "no"]
    assert report.final_ms < report.original_ms and report.exact
    assert oracle.calls == 3 and len(compiled) == 4  # original + 2 candidates; 2 re-checks of 2 graphs


def test_measuring_needs_an_oracle_and_a_compiler():
    x = torch.randn(1, 3, 10, 10)
    with pytest.raises(TypeError, match="oracle"):
        adapt(_model(), "host", x)
    with pytest.raises(TypeError, match="compile_fn"):
        adapt(_model(), "host", x, oracle=StubOracle())
    adapted = adapt(_model(), "host", x, measure=False)  # proposing needs neither
    assert adapted.adapt_report.kept
