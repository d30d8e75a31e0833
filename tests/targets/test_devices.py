import pytest

from omnic.compile.target import host_target_dict, tvm_target
from omnic.core.targets import DEVICES, get_device
from omnic.core.targets import host_cpu_features

REQUIRED = {"host", "S888", "S888-gpu", "rasp4b", "jetson-orin-nano", "a100"}


def test_table_has_required_devices_with_precisions():
    assert REQUIRED <= set(DEVICES)
    for spec in DEVICES.values():
        assert spec.precisions and set(spec.precisions) <= {"fp32", "fp16", "int8"}
        assert spec.kind in ("cpu", "gpu")
        assert spec.rpc_key


def test_table_is_frozen():
    with pytest.raises(TypeError):
        DEVICES["new"] = DEVICES["host"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        get_device("host").kind = "gpu"  # type: ignore[misc]


def test_host_target_uses_detected_simd_features():
    target = tvm_target(get_device("host"), num_threads=2)
    assert str(target.kind.name) == "llvm"
    assert int(target.attrs["num-cores"]) == 2
    mcpu = str(target.attrs["mcpu"])
    assert mcpu == host_target_dict(2)["mcpu"]
    from tvm.target import codegen

    if host_cpu_features()["avx512"]:
        # LLVM must be told a CPU that has AVX-512, otherwise it emits 256-bit code at best
        assert codegen.llvm_cpu_has_features(["avx512f"], target)


@pytest.mark.parametrize("name", sorted(REQUIRED - {"host"}))
def test_every_device_builds_a_tvm_target(name):
    spec = get_device(name)
    target = tvm_target(spec)
    assert str(target.kind.name) == {"cuda": "cuda", "opencl": "opencl", "cpu": "llvm"}[spec.device_api]
    if spec.kind == "gpu":
        assert target.host is not None
        # the Adreno tag has no host: the table must give it an aarch64 one
        expected = "x86_64" if name == "a100" else "aarch64"
        assert expected in str(target.host.attrs.get("mtriple", ""))
