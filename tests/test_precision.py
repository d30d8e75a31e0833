"""Precision: fp16 on GPU targets and clip activations, int8 calibration, integer kernels, accuracy."""
import re

import numpy as np
import pytest
import torch
from torch import nn

import omnic
import omnic.core.ir
from omnic import engine
from omnic.compile import build
from omnic.compile import quant
from omnic.compile.target import tvm_target
from omnic.examples.digits import digits_data, evaluate, train_digits_cnn


def _clip_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1), nn.Hardswish(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


# ------------------------------------------------------------------------------------- fp16
@pytest.mark.parametrize("device,kind", [("a100", "cuda"), ("S888-gpu", "opencl")])
def test_fp16_gpu_build_uses_half_precision(device, kind):
    dm = engine.compile(_clip_model(), {"device": device, "precision": "fp16"}, torch.randn(1, 3, 16, 16),
                        progress=False)
    src_kind, source = build.device_source(dm.executable)
    assert src_kind == kind
    assert re.search(r"\bhalf\b", source), "fp16 kernels should compute in half"
    assert dm.report["precision"] == "fp16"


def test_fp16_host_with_relu6_hardswish_is_close_to_fp32():
    model, x = _clip_model(), torch.randn(1, 3, 16, 16)
    dm = engine.compile(model, {"device": "host", "precision": "fp16"}, x, progress=False)
    with torch.no_grad():
        ref = model(x)
    assert (dm(x) - ref).abs().max() / ref.abs().max() < 1e-2
    assert dm.report["max_rel_error"] < 1e-2


# ------------------------------------------------------------------------------------- int8
class ConvDense(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        # 3 inputs and 24 outputs do not fill VNNI's 4 x 16 packing: both are padded with zero weights
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = self.bn(self.c1(x))  # signed input to c2: the VNNI conv shifts it to uint8 and corrects
        return self.fc(torch.relu(self.c2(x)).flatten(1))


@pytest.fixture(scope="module")
def conv_dense():
    torch.manual_seed(0)
    model = ConvDense()
    model.train()
    model(torch.randn(8, 3, 8, 8))  # non-trivial BN statistics, folded into c1 before quantization
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    calib = [torch.randn(2, 3, 8, 8) for _ in range(8)]
    dep = {"device": "host", "precision": "int8"}
    integer = engine.compile(model, dep, x, calibration=calib, progress=False)
    simulated = engine.compile(model, dep, x, calibration=calib, quantization={"integer": False}, progress=False)
    return model, x, integer, simulated


def test_integer_rewrite_matches_simulated_quantization(conv_dense):
    model, x, integer, simulated = conv_dense
    a, b = integer(x), simulated(x)
    # one quantization step of the output: one step of the linear layer's input through its largest weight
    fc = integer.report["quantization"]["layers"][-1]
    assert fc["op"] == "matmul"
    step = fc["act_scale"] * float(model.fc.weight.detach().abs().max())
    assert float((a - b).abs().max()) <= step
    with torch.no_grad():
        ref = model(x)
    assert float((a - ref).abs().max() / ref.abs().max()) < 0.05  # and int8 is close to fp32


def test_ops_precision_and_quantization_report(conv_dense):
    _, _, integer, simulated = conv_dense
    rep = integer.report
    assert rep["precision"] == "int8"
    assert rep["ops_precision"]["int8"] == {"conv2d": 2, "matmul": 1}
    q = rep["quantization"]
    assert q["integer"] and q["batches"] == 8 and q["samples"] == 16 and q["source"] == "calibration"
    assert [layer["act_dtype"] for layer in q["layers"]] == ["int8", "int8", "uint8"]  # after ReLU: unsigned
    vnni = omnic.core.targets.get_device("host").int_dot_product == "vnni"
    assert q["dot_product_packed_convs"] == (2 if vnni else 0) and q["dot_product"] == ("vpdpbusd" if vnni else None)
    acc = q["accuracy"]
    assert acc["samples"] == 16 and acc["max_rel_error"] < 0.05 and acc["top1_agreement"] >= 0.75
    assert simulated.report["quantization"]["integer"] is False


def test_integer_kernels_are_int8_times_int8_into_int32(conv_dense):
    _, _, integer, simulated = conv_dense

    import tvm

    def integer_kernels(dm):
        found = []
        for gv, func in dm.module.functions_items():
            text = func.script() if isinstance(func, tvm.tirx.PrimFunc) else ""
            # the accumulation multiplies two widened 8-bit operands into an int32 sum
            if re.search(r'T\.Cast\("int32", \w+\[[^\]]*\]\) \* T\.Cast\("int32", \w+\[', text) and re.search(
                    r'"u?int8"', text):
                found.append(gv.name_hint)
        return found

    kernels = integer_kernels(integer)
    assert any("conv2d" in k for k in kernels) and any("matmul" in k for k in kernels), kernels
    assert not integer_kernels(simulated)
    if omnic.core.targets.get_device("host").int_dot_product == "vnni":
        # the packed conv reads uint8 data and a weight with 16 outputs x 4 inputs innermost
        packed = [f.script() for _, f in integer.module.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and quant.PACKED_BLOCK in f.script()]
        assert packed and re.search(r'\(16\)?, (T\.int64\()?4\)?\), "int8"', packed[0]) and '"uint8"' in packed[0]
    ll = integer.executable.mod.imports[0].inspect_source("ll")
    assert re.search(r"[sz]ext <\d+ x i8> .* to <\d+ x i32>", ll)  # widening 8-bit loads in the kernels


def test_depthwise_precision_choice_is_reported_and_both_are_close_to_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
                          nn.Conv2d(32, 16, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    calib = [torch.randn(1, 3, 8, 8) for _ in range(4)]
    dep = {"device": "host", "precision": "int8"}
    with torch.no_grad():
        ref = model(x)
    counts = {}
    for choice in ("int8", "fp32"):
        dm = engine.compile(model, dep, x, calibration=calib, quantization={"depthwise": choice}, progress=False)
        q = dm.report["quantization"]
        assert q["depthwise"] == choice
        counts[choice] = dm.report["ops_precision"]
        assert float((dm(x) - ref).abs().max() / ref.abs().max()) < 0.05
    assert counts["int8"]["int8"] == {"conv2d": 3} and "conv2d_depthwise" not in counts["int8"]["float32"]
    assert counts["fp32"]["int8"] == {"conv2d": 2} and counts["fp32"]["float32"]["conv2d_depthwise"] == 1
    with pytest.raises(omnic.OmnicError, match="depthwise"):
        quant.QuantConfig(depthwise="int4")


@pytest.mark.parametrize("family", sorted(quant.DOT_PRODUCT_PACKINGS))
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_dot_product_packing_is_exact(family, act_dtype):
    """Packing (zero-padded channels, shifted activations, the correction) changes no integer:
    the packed conv equals the plain int8 conv bit for bit, run here on the host's LLVM."""
    import tvm
    from tvm import relax

    rng = np.random.default_rng(0)
    lo, hi = (0, 256) if act_dtype == "uint8" else (-128, 128)
    x_np = rng.integers(lo, hi, size=(1, 9, 9, 3), dtype=np.int32).astype(act_dtype)  # 3 inputs: padded to 4
    w_np = rng.integers(-128, 128, size=(6, 3, 3, 3), dtype=np.int32).astype("int8")  # 6 outputs: padded
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_np.shape, act_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w_np), strides=2, padding=1, data_layout="NHWC",
                                                  kernel_layout="OHWI", out_dtype="int32"))
        bb.emit_func_output(y)
    plain = bb.get()
    packed, n = quant.pack_dot_product(plain, family)
    assert n == 1

    def run(mod):
        ex = tvm.compile(relax.transform.LegalizeOps()(mod), tvm_target(omnic.core.targets.get_device("host")))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x_np)).numpy()

    expected, actual = run(plain), run(packed)
    assert actual.shape == expected.shape == (1, 5, 5, 6)
    np.testing.assert_array_equal(actual, expected)


def test_int8_calibration_inputs_and_percentile():
    model = _clip_model()
    x = torch.randn(4, 3, 16, 16)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 16, 16), torch.zeros(24, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # (inputs, labels) batches of another size
    calib = quant.calibrate(omnic.core.ir.trace(model, (x,)), loader, quant.QuantConfig(method="percentile",
                                                                                       percentile=99.0))
    assert calib.batches == 3 and calib.samples == 24 and len(calib.layers) == 3
    for layer in calib.layers:
        assert layer.pct is not None and layer.pct <= max(abs(layer.amin), abs(layer.amax)) + 1e-6
    assert calib.layers[1].amin >= 0  # after ReLU6
    with pytest.raises(omnic.QuantizationError, match="calibration"):
        quant.calibrate(omnic.core.ir.trace(model, (x,)), 42)
    with pytest.raises(omnic.QuantizationError, match="does not match"):
        quant.calibrate(omnic.core.ir.trace(model, (x,)), torch.randn(2, 3, 8, 8))
    with pytest.raises(omnic.OmnicError):
        quant.QuantConfig(method="entropy-ish")


def test_weight_quantization_is_per_channel_symmetric():
    w = np.array([[1.0, -0.5], [0.01, 0.02]], dtype=np.float32)
    q, s = quant.quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and s.shape == (2,)
    assert q[0, 0] == 127 and q[1, 1] == 127 and q[0, 1] == -64
    assert np.allclose(q * s[:, None], w, atol=s.max() / 2)


def test_oracle_measures_int8(fresh_cache):
    model, x = _clip_model(), torch.randn(1, 3, 16, 16)
    ms = engine.get_latency(model, {"device": "host", "precision": "int8"}, x)
    assert ms > 0
    oracle = engine.default_oracle()
    fresh = oracle.fresh_measurements
    assert engine.get_latency(model, {"device": "host", "precision": "int8"}, x) == ms
    assert oracle.fresh_measurements == fresh  # stored under precision int8


# ---------------------------------------------------------------------------- accuracy (digits)
def test_digits_cnn_int8_accuracy_within_one_point_of_fp32():
    data = digits_data()
    model = train_digits_cnn(data, epochs=5)
    fp32 = evaluate(model, data.x_test, data.y_test, batch=64)
    assert fp32 > 0.9
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                         batch_size=64)
    dm = engine.compile(model, {"device": "host", "precision": "int8"}, data.x_test[:64], calibration=loader,
                        progress=False)
    int8 = evaluate(dm, data.x_test, data.y_test, batch=64)
    assert abs(int8 - fp32) <= 0.01, (fp32, int8)
    assert dm.report["ops_precision"]["int8"] == {"conv2d": 4, "matmul": 1}
    assert dm.report["quantization"]["accuracy"]["top1_agreement"] >= 0.97


def test_onnx_qdq_model_is_accepted_and_float_onnx_is_a_clear_error(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, x = _clip_model(), torch.randn(1, 3, 16, 16)
    fp32_path, qdq_path = tmp_path / "m.onnx", tmp_path / "m_qdq.onnx"
    torch.onnx.export(model, (x,), str(fp32_path), dynamo=False, opset_version=17, input_names=["x"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": torch.randn(1, 3, 16, 16).numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    dm = engine.compile(str(qdq_path), {"device": "host", "precision": "int8"}, progress=False)
    assert dm.report["quantization"]["source"] == "onnx-qdq"
    assert dm.report["ops_precision"]["simulated_int8"]["dequantize"] > 0
    assert dm.report["max_rel_error"] < 1e-3  # vs onnxruntime running the same QDQ model
    with pytest.raises(omnic.QuantizationError, match="float ONNX"):
        engine.compile(str(fp32_path), {"device": "host", "precision": "int8"}, progress=False)


def test_int8_cross_compiles_for_arm_with_integer_instructions():
    model, x = _clip_model(), torch.randn(1, 3, 16, 16)
    dm = engine.compile(model, {"device": "S888", "precision": "int8"}, x, progress=False)
    assert dm.report["ops_precision"]["int8"] == {"conv2d": 2, "matmul": 1}
    asm = dm.executable.mod.imports[0].inspect_source("asm")
    # 8-bit multiply-accumulates: widening smlal/umlal or the dot-product sdot/udot
    assert re.search(r"\b(s|u)(mlal2?|dot)\b", asm)
    q = dm.report["quantization"]
    assert q["dot_product"] == "sdot" and q["dot_product_packed_convs"] == 2  # both convs: 3->4 and 16 inputs


def test_arm_packed_int8_conv_is_tensorized_with_sdot_by_metaschedule():
    """The S888 packing is what MetaSchedule's "dotprod" rules tensorize: every design space of
    the packed conv uses ``dot_4x4_i8i8s32_sdot``, and a schedule from it builds to ``sdot``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from omnic.compile import tuning

    model, x = _clip_model(), torch.randn(1, 3, 16, 16)
    dm = engine.compile(model, {"device": "S888", "precision": "int8"}, x, progress=False)
    packed = [f for _, f in dm.module.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and quant.PACKED_BLOCK in f.script()]
    assert packed
    target = tvm_target(omnic.core.targets.get_device("S888"))
    tuning.light_tensor_intrinsics(target)
    # a fixed seed: the design space's sampled tile sizes decide the build, and TVM's VectorizeLoop
    # rejects some of them ("Cannot broadcast lanes=4 to 16"; about 1 build in 4 with random seeds)
    ctx = ms.TuneContext(mod=tvm.IRModule({"main": packed[-1].with_attr("global_symbol", "main")}), target=target,
                         space_generator="post-order-apply", search_strategy="evolutionary", rand_state=1)
    spaces = ctx.generate_design_space()
    assert spaces and all("dot_4x4_i8i8s32_sdot" in str(sp.trace) for sp in spaces)
    sch = spaces[0]
    assert all(post.apply(sch) for post in ctx.space_generator.postprocs)
    asm = tvm.compile(sch.mod, target=target).mod.inspect_source("asm")
    assert re.search(r"\bsdot\b", asm)
