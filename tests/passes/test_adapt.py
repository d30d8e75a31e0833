"""nas.adapt on the zoo's MobileNetV3-style and conv+attention nets on host (measured, compiled).

Kept lean: each untuned compile+measure costs seconds on the shared machine, so the MobileNetV3
run tries only the channel padding (the other passes have their own tests; the full default list
runs in the benchmark, benchmarks/README.md).
"""
from __future__ import annotations

import json

import pytest
import torch

from omnic import engine, nas
from omnic.examples import zoo
from omnic.core.errors import DeploymentError
from omnic.core.measure import MeasureConfig

LEAN = MeasureConfig(min_repeat_ms=20.0, repeats=5, max_rounds=2, time_budget_s=0.1)


def _not_worse(report) -> None:
    assert report.original_ms is not None and report.final_ms is not None
    assert report.final_ms <= report.original_ms + report.original_noise_ms + report.final_noise_ms


@pytest.fixture(scope="module")
def v3():
    model, x = zoo.get_model("mobilenet_v3_small", input_shape=(1, 3, 64, 64))
    adapted = nas.adapt(model, "host", x, exact_only=True, config=LEAN,
                        passes=("legalize_unsupported", "pad_channels"))
    return model, x, adapted


def test_adapt_mobilenet_v3(v3):
    model, x, adapted = v3
    report = adapted.adapt_report
    adapted.graph.lint()
    by_name = {s.name: s for s in report.steps}
    assert by_name["pad_channels"].nodes_changed  # 72 -> 80, 24 -> 32, ... on a multiple-of-16 host
    for step in report.steps:
        if step.nodes_changed and step.status != "required":
            assert step.before_ms is not None and step.after_ms is not None, step
            assert step.max_rel_diff is not None and step.max_rel_diff < 1e-4
            assert step.status.startswith(("kept", "rejected: "))
    _not_worse(report)
    assert report.exact and report.max_rel_diff < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=1e-4, atol=1e-4)
    assert "pad_channels" in report.table() and "original" in report.table()
    assert json.loads(report.json())["device"] == "host" and report["final_ms"] == report.final_ms


def test_adapted_mobilenet_v3_compiles(v3):
    _, x, adapted = v3
    dm = engine.compile(adapted, "host", x, progress=False)
    assert dm.report["max_rel_error"] < 1e-4


def test_adapt_conv_attention():
    model, x = zoo.get_model("conv_attention", input_shape=(1, 3, 32, 32))
    adapted = nas.adapt(model, "host", x, config=LEAN)
    report = adapted.adapt_report
    by_name = {s.name: s for s in report.steps}
    assert by_name["fold_batchnorm"].after_ms is not None  # the stem's BN: measured
    # GELU is slow on host, but approximate swaps stay off unless asked for
    assert by_name["swap_activations"].status.startswith("off: approximate")
    assert by_name["swap_activations"].after_ms is None
    _not_worse(report)
    assert report.exact and report.max_rel_diff < 1e-4
    dm = engine.compile(adapted, "host", x, progress=False)
    assert dm.report["max_rel_error"] < 1e-4


def test_adapt_approximate_is_bounded_and_reported():
    model, x = zoo.get_model("conv_attention", input_shape=(1, 3, 32, 32))
    tight = nas.adapt(model, "host", x, approximate=True, tolerance=1e-3, config=LEAN,
                      passes=("swap_activations",))
    step = tight.adapt_report.steps[0]
    assert step.status.startswith("rejected: output moved") and step.max_rel_diff > 1e-3
    loose = nas.adapt(model, "host", x, approximate=True, tolerance=1.0, config=LEAN, passes=("swap_activations",))
    step = loose.adapt_report.steps[0]
    assert not step.exact and step.after_ms is not None and step.max_rel_diff > 0
    assert step.status.startswith(("kept", "rejected: "))
    _not_worse(loose.adapt_report)
    with pytest.raises(DeploymentError):
        nas.adapt(model, "host", x, exact_only=True, approximate=True)


def test_cli_adapt(capsys):
    from omnic.cli.app import main

    # the same model and input as test_adapt_conv_attention: measurements come from the store
    rc = main(["adapt", "conv_attention", "--input-shape", "1,3,32,32", "--exact-only", "--json",
               "--passes", "fold_batchnorm,remove_noops"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in data["steps"]] == ["fold_batchnorm", "remove_noops"]
    assert data["original_ms"] > 0 and data["exact"]


def test_adapt_without_measuring_proposes_for_an_unattached_device():
    from omnic.core.errors import DeviceUnreachableError

    model, x = zoo.get_model("conv_attention", input_shape=(1, 3, 32, 32))
    with pytest.raises(DeviceUnreachableError, match="measure=False"):
        nas.adapt(model, "S888-gpu", x)
    adapted = nas.adapt(model, "S888-gpu", x, measure=False, approximate=True, tolerance=1.0)
    report = adapted.adapt_report
    statuses = {s.name: s.status for s in report.steps}
    # S888-gpu: GELU slow, no fast LayerNorm -> both swaps proposed; nothing measured
    assert statuses["swap_activations"] == statuses["layernorm_to_batchnorm"] == "applied (unmeasured)"
    assert report.final_ms is None and not report.exact and report.max_rel_diff > 0
    assert "unmeasured" in report.table()
