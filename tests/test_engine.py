"""engine.compile / get_latency / profile on host, checked against PyTorch."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import omnic
from omnic import engine
from omnic.examples.zoo import ZOO, get_model
from tests.cli_models import MaxPoolNet


@pytest.fixture(scope="module")
def small():
    model, x = get_model("resnet_small")
    return model, x, engine.compile(model, "host", x)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_matches_pytorch_on_host(name):
    model, x = get_model(name, input_shape=ZOO[name].test_shape)
    dm = engine.compile(model, {"device": "host"}, x)
    with torch.no_grad():
        expected = model(x)
    out = dm(x)
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4
    assert dm.report["max_rel_error"] is not None and dm.report["max_rel_error"] <= 1e-4


def test_numpy_inputs_and_a_second_input(small):
    model, x, dm = small
    x2 = torch.randn_like(x)
    out = dm(x2.numpy())
    with torch.no_grad():
        ref = model(x2)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_torch_inputs_are_shared_with_tvm_and_outputs_stay_valid(small):
    """Aligned contiguous torch inputs go to TVM without a copy; an output kept from one call is
    not overwritten by the next; other inputs (strided, numpy) take the copying path."""
    model, x, dm = small
    a, b = torch.randn_like(x), torch.randn_like(x)
    assert dm._shared_tensors((a,)) is not None
    strided = torch.randn(x.shape[0], x.shape[1], x.shape[3], x.shape[2]).transpose(2, 3)
    assert dm._shared_tensors((strided,)) is None
    out_a = dm(a)
    kept = out_a.clone()
    out_b = dm(b)
    assert torch.equal(out_a, kept) and not torch.equal(out_a, out_b)
    with torch.no_grad():
        for inp, out in ((a, out_a), (b, out_b), (strided, dm(strided))):
            ref = model(inp)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(dm(a.numpy()), out_a)


def test_multi_output_model():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 2)

        def forward(self, x, y):
            h = self.conv(x).mean(dim=(2, 3)) + y
            return self.a(h), self.b(h).relu()

    model = TwoHeads().eval()
    inputs = (torch.randn(1, 3, 16, 16), torch.randn(1, 8))
    dm = engine.compile(model, "host", inputs)
    out = dm(*inputs)
    ref = model(*inputs)
    assert isinstance(out, tuple) and len(out) == 2
    for o, r in zip(out, ref):
        assert torch.allclose(o, r.detach(), atol=1e-5)


def test_latency_is_measured_with_spread(small):
    _, _, dm = small
    m = dm.measure()
    assert m.ok and m.median_ms > 0 and m.runs >= 5
    assert 0 <= m.spread < 1
    assert min(m.results_ms) <= m.median_ms <= max(m.results_ms)
    assert dm.get_latency() == pytest.approx(m.median_ms)


def test_wrong_call_shape_is_a_typed_error(small):
    _, _, dm = small
    with pytest.raises(omnic.InputShapeError, match="compiled for"):
        dm(torch.randn(1, 3, 16, 16))
    with pytest.raises(omnic.InputShapeError, match="input"):
        dm(torch.randn(1, 3, 32, 32), torch.randn(1))


def test_get_latency_uses_the_store(small, fresh_cache):
    model, x, _ = small
    first = engine.get_latency(model, "host", x)
    oracle = engine.default_oracle()
    fresh = oracle.fresh_measurements
    again = engine.get_latency(model, "host", x)
    assert again == first and oracle.fresh_measurements == fresh  # a lookup, not a new run
    assert (fresh_cache / "latency.sqlite").exists()


def test_remote_device_without_tracker_says_how_to_attach():
    model, x = get_model("resnet_small")
    with pytest.raises(omnic.DeviceUnreachableError) as info:
        engine.get_latency(model, {"device": "rasp4b"}, x)
    assert "omnic serve" in str(info.value) and "tracker" in str(info.value)


def test_export_load_round_trip(small, tmp_path):
    model, x, dm = small
    out_dir = dm.export(tmp_path / "artifact")
    meta = json.loads((out_dir / "metadata.json").read_text())
    assert meta["device"] == "host" and meta["precision"] == "fp32"
    assert meta["structural_hash"] == dm.structural_hash
    assert meta["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert meta["tvm_version"] and meta["omnic_version"] == omnic.__version__
    loaded = omnic.load(out_dir)
    assert torch.allclose(loaded(x), dm(x))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-4)
    assert loaded.get_latency() > 0
    with pytest.raises(omnic.ArtifactError):
        omnic.load(tmp_path / "nowhere")


def test_profile_reports_kernels_flops_params_memory(small):
    model, x, _ = small
    prof = engine.profile(model, "host", x)
    assert prof["latency_ms"] > 0
    kernels = [k for k in prof["kernels"] if k["kind"] == "kernel"]
    assert kernels and all(k["total_ms"] >= 0 for k in kernels)
    assert any("conv2d" in k["name"] for k in kernels)
    assert abs(sum(k["share"] for k in prof["kernels"]) - 1.0) < 1e-6
    # FLOPs of the first conv alone: 2 * Cout * Cin * 3 * 3 * H * W
    assert prof["flops"] > 2 * 16 * 3 * 9 * 32 * 32
    assert prof["params"] == sum(p.numel() for p in model.parameters())
    assert prof["param_bytes"] >= 4 * prof["params"]
    assert prof["peak_activation_bytes"] >= 2 * 16 * 32 * 32 * 4  # two live 16x32x32 maps
    table = prof.table()
    assert "FLOPs" in table and "conv2d" in table
    json.dumps(dict(prof))  # JSON-friendly


def test_onnx_and_exported_program_inputs(tmp_path):
    model, x = get_model("resnet_small")
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"])
    dm = engine.compile(str(path), "host")  # static shapes: no example inputs needed
    assert dm.report["source"] == "onnx" and dm.report["max_rel_error"] <= 1e-4
    with torch.no_grad():
        assert torch.allclose(dm(x), model(x), atol=1e-4)
    ep = torch.export.export(model, (x,))
    dm_ep = engine.compile(ep, "host")
    assert dm_ep.report["source"] == "exported_program" and dm_ep.report["max_rel_error"] <= 1e-4


def test_unsupported_operator_is_named():
    with pytest.raises(omnic.UnsupportedOperatorError) as info:
        engine.compile(MaxPoolNet().eval(), "host", torch.randn(1, 3, 10, 10))
    msg = str(info.value)
    assert "adaptive_max_pool2d" in msg and "pool" in msg and "fix" in msg


def test_int8_without_calibration_set_calibrates_on_the_example_inputs():
    model, x = get_model("resnet_small")
    dm = engine.compile(model, {"device": "host", "precision": "int8"}, x)
    assert dm.report["ops_precision"]["int8"].get("conv2d", 0) > 0
    assert dm.report["quantization"]["source"] == "example_inputs"
    assert dm.report["max_rel_error"] < 0.1


def test_fp16_compiles_with_clip_activations():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Hardswish()).eval()
    x = torch.randn(1, 3, 16, 16)
    dm = engine.compile(model, {"device": "host", "precision": "fp16"}, x)
    assert dm.report["max_rel_error"] < 1e-2


def test_relative_error_counts_nan_and_inf_as_disagreement():
    ref = [np.array([[1.0, -2.0, 4.0]], dtype=np.float32)]
    assert engine.relative_error([ref[0].copy()], ref) == 0.0
    assert engine.relative_error([ref[0] + np.float32(0.04)], ref) == pytest.approx(0.01)
    assert engine.relative_error([np.array([[1.0, np.nan, 4.0]], dtype=np.float32)], ref) == float("inf")
    assert engine.relative_error([np.array([[1.0, np.inf, 4.0]], dtype=np.float32)], ref) == float("inf")
    assert engine.relative_error([np.zeros((1, 2), dtype=np.float32)], ref) == float("inf")  # wrong shape
    both_nan = [np.array([np.nan, 2.0])]
    assert engine.relative_error([np.array([np.nan, 2.0])], both_nan) == 0.0  # PyTorch's NaN reproduced
