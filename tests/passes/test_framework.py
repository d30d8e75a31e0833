"""The pass framework: reports, purity, the runner's error wrapping."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from omnic.core import ir
from omnic.core.errors import OmnicError, PassError
from omnic.passes import DEFAULT_PASSES, PassReport, registered_passes, run_passes
from tests.passes.helpers import assert_unchanged, snapshot, spec


def _model():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1)).eval()


def test_registry_matches_default_order():
    passes = registered_passes()
    assert set(DEFAULT_PASSES) == set(passes)
    assert passes["legalize_unsupported"].required
    assert not passes["swap_activations"].exact and passes["pad_channels"].exact


def test_report_is_frozen_and_serialisable():
    rep = PassReport(name="x", nodes_changed=("a",), exact=True, why="because")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.name = "y"  # type: ignore[misc]
    assert rep.changed and rep.to_dict()["nodes_changed"] == ["a"]


def test_runner_applies_every_default_pass_without_mutating_input():
    x = torch.randn(1, 3, 10, 10)
    gm = ir.trace(_model(), x).gm
    snap = snapshot(gm)
    device = spec(slow_ops={"gelu": "erf"}, channel_multiple=8, max_depthwise_kernel=3,
                  has_fast_layernorm=False)
    run = run_passes(gm, device, DEFAULT_PASSES)
    assert_unchanged(gm, snap)
    run.gm.graph.lint()
    assert [r.name for r in run.reports] == list(DEFAULT_PASSES)
    assert {r.name for r in run.reports if r.changed} == {
        "fold_batchnorm", "remove_noops", "adaptive_pool_to_mean", "swap_activations"}


def test_runner_names_the_failing_pass_and_those_before_it():
    def broken(gm, device):
        raise RuntimeError("boom")

    gm = ir.trace(_model(), torch.randn(1, 3, 10, 10)).gm
    with pytest.raises(PassError, match=r"pass 'broken' failed \(after \['fold_batchnorm', 'remove_noops'\]\).*boom") as info:
        run_passes(gm, spec(), ["fold_batchnorm", "remove_noops", broken])
    assert isinstance(info.value, OmnicError)
    with pytest.raises(PassError, match="unknown pass 'nope'; known passes: legalize_unsupported"):
        run_passes(gm, spec(), ["nope"])
