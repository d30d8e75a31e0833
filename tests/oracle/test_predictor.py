"""The kernel-level latency predictor: features, fit on measured variants, held-out accuracy, save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from omnic.core.deployment import Deployment
from omnic.core.ir import trace
from omnic.core.measure import MeasureConfig
from omnic.oracle import predictor as P


def _variant(family: str, resolution: int, **params) -> P.Variant:
    return P.Variant(family=family, params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                        for k, v in params.items())), resolution=resolution)


# Small, fast-compiling variants: 8 to fit on, 3 held out (other widths, depths and resolutions).
FIT = [_variant("resnet", r, layers=l, widths=w, stem="small", num_classes=10) for r, l, w in (
    (32, [1, 1, 1], [8, 16, 32]), (24, [1, 1, 1], [16, 32, 64]), (32, [2, 1, 1], [8, 16, 32]),
    (24, [1, 2, 1], [12, 24, 48]), (32, [1, 1], [16, 32]), (24, [2, 2], [8, 16]))] + [
    _variant("mobilenet_v2", r, width_mult=wm, num_classes=10) for r, wm in ((32, 0.25), (24, 0.35))]
HELD_OUT = [_variant("resnet", 28, layers=[1, 1, 2], widths=[12, 24, 48], stem="small", num_classes=10),
            _variant("resnet", 28, layers=[1, 1, 1], widths=[8, 16, 32], stem="small", num_classes=10),
            _variant("mobilenet_v2", 28, width_mult=0.25, num_classes=10)]
# a cheap protocol: the test checks the mechanics, the benchmark measures with the oracle's
CHEAP = {"config": MeasureConfig(min_repeat_ms=5, repeats=3, max_rounds=1, time_budget_s=0.1), "runs": 5}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("pred") / "samples-host.jsonl"
    fit = P.collect(FIT, "host", path=path, log=lambda *_: None, **CHEAP)
    # held out: measured in two sessions (the second from the saved library), as the benchmark does
    held = P.collect(HELD_OUT, "host", path=path, log=lambda *_: None, sessions=2, **CHEAP)
    assert len(fit) == len(FIT) and len(held) == len(HELD_OUT)
    return fit, held


def test_conv_features_match_the_conv_arithmetic():
    cin, cout, k, h, w = 8, 16, 3, 12, 10
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1, bias=False), nn.ReLU()).eval()
    prepared, _, _ = P.prepare(trace(model, torch.randn(1, cin, h, w)), Deployment())
    kernels = {k_["name"]: k_ for k_ in P.kernel_features(prepared)}
    conv = next(v for n, v in kernels.items() if "conv2d" in n)
    f = conv["features"]
    assert f["flops"] == 2 * cout * cin * k * k * h * w
    assert (f["kind"], f["H"], f["W"], f["cin"], f["cout"], f["kh"], f["kw"], f["stride"], f["groups"]) == (
        "conv", h, w, cin, cout, k, k, 1, 1)
    assert f["tok_conv2d"] == 1 and f["tok_relu"] == 1
    assert f["log_weight_bytes"] == pytest.approx(np.log2(1 + 4 * cout * cin * k * k))
    assert conv["calls"] == 1


def test_work_terms_count_the_loop_nests():
    cin, cout, k, h, w = 8, 16, 3, 12, 10
    model = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1, bias=False), nn.ReLU()).eval()
    prepared, _, _ = P.prepare(trace(model, torch.randn(1, cin, h, w)), Deployment())
    conv = next(k_ for k_ in P.kernel_features(prepared) if "conv2d" in k_["name"])["features"]
    macs = cout * cin * k * k * h * w
    # the reduction's innermost loop runs over the 8 input channels: long enough to count as such
    assert conv["w_reduce_points"] == macs and conv["w_short_reduce_points"] == 0
    assert conv["w_reduce_entries"] == macs / cin
    # pad (input + border) and relu are elementwise loop nests over whole tensors
    assert conv["w_spatial_points"] >= (h + 2) * (w + 2) * cin + h * w * cout
    assert conv["w_call"] == 1 and conv["w_blocks"] >= 2


def test_a_second_session_keeps_the_fastest_figures(samples):
    _, held = samples
    for s in held:
        assert s["sessions"] == 2 and len(s["e2e_passes_ms"]) == 8
        assert s["e2e_ms"] == min(s["e2e_passes_ms"]) <= s["e2e_first_ms"]
        assert s["e2e_again_ms"] == min(s["e2e_passes_ms"][4:])  # the second session on its own
        assert s["e2e_early_ms"] == min(s["e2e_passes_ms"][:4])
        assert all(k["ms_per_call"] <= k["ms_per_call_median"] for k in s["kernels"])


def test_depthwise_conv_is_recognised():
    model = nn.Sequential(nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)).eval()
    prepared, _, _ = P.prepare(trace(model, torch.randn(1, 8, 12, 12)), Deployment())
    conv = next(k for k in P.kernel_features(prepared) if "conv2d" in k["name"])["features"]
    assert (conv["kind"], conv["groups"], conv["stride"], conv["H"], conv["kh"]) == ("dwconv", 8, 2, 6, 5)
    assert conv["flops"] == 2 * 8 * 5 * 5 * 6 * 6


def test_samples_have_measured_kernels(samples):
    fit, _ = samples
    for s in fit:
        assert s["e2e_ms"] > 0 and not s["unmatched_kernels"]
        assert all(k["ms_per_call"] > 0 for k in s["kernels"])
        # hook-corrected kernel times add up to the end-to-end time within what contention from
        # other processes does to either (up to ~3x here); a unit or matching bug is far off
        assert 0.1 * s["e2e_min_ms"] < s["kernel_sum_ms"] < 3 * s["e2e_min_ms"]


def test_held_out_accuracy_is_computed(samples):
    fit, held = samples
    assert not {s["key"] for s in fit} & {s["key"] for s in held}
    # the contention-robust target: end-to-end figures on a shared 2-core box swing up to 2x
    pred = P.KernelLatencyPredictor("host", target="kernel_sum_ms").fit(fit)
    ev = pred.evaluate(held)
    measured = np.array([s["kernel_sum_ms"] for s in held])
    predicted = np.array([pred.predict_features(s["kernels"]) for s in held])
    ape = np.abs(predicted - measured) / measured
    # the figure reported is the figure computed from the predictions, not a constant
    assert ev.n == 3
    assert ev.within_10 == pytest.approx(float(np.mean(ape <= 0.10)))
    assert ev.rmse_ms == pytest.approx(float(np.sqrt(np.mean((predicted - measured) ** 2))))
    assert ev.median_ape == pytest.approx(float(np.median(ape)))
    # loose, but a predictor that learned nothing (or a wrong unit) fails it
    assert ev.median_ape < 0.5, ev.table()
    assert pred.predict_many([s["kernels"] for s in held]) == pytest.approx(list(predicted))


def test_predict_from_a_model_builds_nothing_and_matches_the_features(samples, monkeypatch):
    fit, _ = samples
    pred = P.KernelLatencyPredictor("host").fit(fit)
    from omnic.compile import build

    def no_build(*_a, **_k):
        raise AssertionError("predict must not build")

    monkeypatch.setattr(build, "build", no_build)
    variant = FIT[0]
    model, x = variant.build()
    ms = pred.predict(model, "host", x)
    # every kernel of the prepared module, as a model has not been built (the sample keeps only
    # the kernels its build ran: a transpose of a constant is folded away)
    prepared, _, _ = P.prepare(trace(model, x), Deployment())
    assert ms == pytest.approx(pred.predict_features(P.kernel_features(prepared)), rel=1e-6)
    stored = next(s for s in fit if s["key"] == variant.key)
    assert set(stored.get("folded_kernels", [])) <= {k["name"] for k in P.kernel_features(prepared)}
    with pytest.raises(P.PredictorError, match="is for 'host'"):
        pred.predict(model, _other_device(), x)


def _other_device() -> Deployment:
    from omnic.core.targets import DEVICES

    name = next(n for n in DEVICES if n != "host")
    return Deployment(device=name)


def test_save_load_round_trip_and_versions(samples, fresh_cache):
    fit, held = samples
    pred = P.KernelLatencyPredictor("host").fit(fit[:5])
    p1 = pred.save(extra={"eval": pred.evaluate(held).to_dict()})
    p2 = pred.save()
    assert (p1.name, p2.name) == ("host-v1.json", "host-v2.json")
    assert P.KernelLatencyPredictor.versions("host") == [1, 2]
    meta = json.loads(p1.read_text())
    assert meta["feature_schema"] == list(P.FEATURES) and meta["tuning_state"] == "untuned"
    loaded = P.KernelLatencyPredictor.load("host")
    assert loaded.version == 2
    for s in held:
        assert loaded.predict_features(s["kernels"]) == pytest.approx(pred.predict_features(s["kernels"]), rel=1e-5)
    assert P.KernelLatencyPredictor.load("host", 1).calibration == pytest.approx(pred.calibration)
    # a file written with another feature schema is refused, not silently mis-read
    meta["schema_version"] = -1
    p1.write_text(json.dumps(meta))
    with pytest.raises(P.PredictorError, match="refit"):
        P.KernelLatencyPredictor.load("host", 1)
    with pytest.raises(P.PredictorError, match="omnic predictor fit"):
        P.KernelLatencyPredictor.load("no-such-device")


def test_fit_needs_samples_and_unfitted_predictor_says_so():
    with pytest.raises(P.PredictorError, match="at least 2"):
        P.KernelLatencyPredictor("host").fit([])
    with pytest.raises(P.PredictorError, match="not fitted"):
        P.KernelLatencyPredictor("host").predict_features([])


def test_accuracy_figures():
    ev = P.accuracy([10.0, 10.0, 10.0, 10.0], [10.5, 9.0, 11.5, 10.0])
    assert ev.within_10 == 0.75
    assert ev.rmse_ms == pytest.approx(np.sqrt((0.25 + 1 + 2.25 + 0) / 4))


def test_variants_are_distinct_and_held_out_excludes_fit():
    fit = P.fit_variants(20)
    held = P.eval_variants(10, 20)
    assert len({v.key for v in fit}) == 20 and not {v.key for v in fit} & {v.key for v in held}
    assert {v.family for v in fit} == set(P.FAMILIES)
    assert P.Variant.from_dict(fit[0].to_dict()) == fit[0]


def test_cli_registers_fit_and_eval():
    from omnic.cli import predictor as cli
    from omnic.cli.app import build_parser

    parser = build_parser()
    args = parser.parse_args(["predictor", "fit", "--device", "host", "--samples", "12"])
    assert (args.func, args.samples) == (cli.cmd_fit, 12)
    args = parser.parse_args(["predictor", "eval", "--device", "host"])
    assert args.func is cli.cmd_eval
    assert cli.TARGETS == P.TARGETS  # the parser's copy, kept so that `omnic --help` imports no TVM
