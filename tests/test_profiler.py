"""Per-call and per-kernel times inside a compiled model, and the conv-by-conv comparison with
ONNX Runtime that the headline benchmark prints."""
import pytest
import torch

from benchmarks.common import conv_by_conv, ort_node_times, weight_sizes_in_call_order
from omnic import engine
from omnic.compile import profiler
from omnic.examples.zoo import get_model


@pytest.fixture(scope="module")
def resnet_small():
    model, x = get_model("resnet_small")
    dm = engine.compile(model, "host", x)
    assert dm.report["max_rel_error"] <= 1e-4  # the build computes what PyTorch computes
    runtime = dm.runtime
    return model, x, dm, runtime, [runtime.to_device(a) for a in dm.random_inputs()]


def test_call_sites_follow_the_call_order_and_sum_into_kernels(resnet_small):
    _, _, dm, runtime, inputs = resnet_small
    sites = profiler.call_sites(runtime.vm, inputs, runs=4, sessions=2, pause_s=0.1)
    assert [s["index"] for s in sites] == list(range(len(sites)))
    assert all(0.0 <= s["fastest_ms"] <= s["median_ms"] for s in sites)
    convs = [s for s in sites if s["kind"] == "kernel" and "conv2d" in s["name"]]
    assert len(convs) >= 5  # resnet_small: stem, two blocks of two, a downsample
    kernels = profiler.kernels_from_sites(sites)
    assert sum(k["calls"] for k in kernels) == len(sites)
    assert abs(sum(k["total_ms"] for k in kernels) - sum(s["fastest_ms"] for s in sites)) < 1e-9
    assert [k["total_ms"] for k in kernels] == sorted((k["total_ms"] for k in kernels), reverse=True)
    first = {k["name"]: k["first_call"] for k in kernels}
    assert all(first[s["name"]] <= s["index"] for s in sites)
    # whole-model time is about the sum of the fastest calls (each call's fastest is a lower bound
    # of its cost), plus a few microseconds a call: with the hook's Python between two calls the
    # runtime's worker threads go back to sleep and each parallel kernel pays their wake-up, which
    # is most of a call when the kernels take microseconds
    assert sum(s["fastest_ms"] for s in sites) <= 1.5 * dm.measure().median_ms + 0.005 * len(sites)


def test_every_ort_conv_pairs_with_the_omnic_kernel_of_the_same_weight(resnet_small):
    model, x, dm, runtime, inputs = resnet_small
    sites = profiler.call_sites(runtime.vm, inputs, runs=4, sessions=1)
    nodes = ort_node_times(model, x, 2, runs=4, sessions=1)
    weights = weight_sizes_in_call_order(dm.module)
    sizes = sorted(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    n_convs = len(sizes)
    versus = conv_by_conv(sites, nodes, weights)
    assert versus["unpaired_ort"] == [] and len(versus["pairs"]) == n_convs
    assert sorted(p["weight_elements"] for p in versus["pairs"]) == sizes
    assert all(p["omnic_ms"] >= 0 and p["ort_ms"] > 0 for p in versus["pairs"])
    assert len({p["ort"] for p in versus["pairs"]}) == n_convs  # each node paired once


def test_profiling_leaves_no_hook_on_the_vm():
    """After profiling, the VM runs as fast as before: a hook left behind (even one that does
    nothing) would cost a Python call around each of the model's calls, every run, from then on."""
    import time

    import numpy as np
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((2, 64), "float32"))
    with bb.function("main", [x]):
        y = x
        for _ in range(40):  # 40 tiny kernels: the run is all VM calls, so a hook dominates it
            y = bb.emit(relax.op.add(y, relax.const(np.float32(1.0))))
        bb.emit_func_output(y)
    mod = relax.transform.FuseOps(0)(relax.transform.LegalizeOps()(bb.get()))
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu(0))
    inputs = [tvm.runtime.tensor(np.zeros((2, 64), "float32"), tvm.cpu(0))]
    main = vm["main"]

    def fastest_of_batches_us() -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                main(*inputs)
            best = min(best, (time.perf_counter() - t) / 200 * 1e6)
        return best

    assert float(main(*inputs).numpy()[0, 0]) == 40.0
    before = fastest_of_batches_us()
    sites = profiler.call_sites(vm, inputs, runs=2, sessions=1)
    assert sum(s["kind"] == "kernel" for s in sites) == 40
    after = fastest_of_batches_us()
    # measured: ~12 us per run without a hook, ~500 us with a do-nothing Python hook
    assert after < 3 * before + 20, (before, after)
