"""Frozen table of devices: what each one is, what it compiles for and what it runs well.

Pure data, without TVM: :mod:`omnic.compile.target` turns a row into a ``tvm.target.Target``
(and names the host CPU through LLVM).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from omnic.core.errors import UnknownDeviceError

#: Precisions omnic knows about. A device lists the subset it supports.
ALL_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One row of the device table.

    Attributes:
        name: Name users write in a deployment (``"host"``, ``"S888"``...).
        description: Human description of the hardware.
        kind: ``"cpu"`` or ``"gpu"``; GPU targets get default (dlight) schedules.
        target: TVM target as a dict or a tag string. ``None`` only for ``host`` (detected by
            :func:`omnic.compile.target.host_target_dict`).
        target_host: Host-side target for GPU devices or cross CPU builds (dict or tag), or None.
        precisions: Precisions this device supports.
        rpc_key: Default key under which this device registers at an RPC tracker.
        local: True when the device is this machine, so it can be measured without a tracker.
        export_format: ``"so"`` when the host toolchain can link it, ``"tar"`` for cross builds
            (the device links the object files when it loads them).
        device_api: TVM runtime device type used on the device (``"cpu"``, ``"cuda"``, ``"opencl"``).
        channel_multiple: Preferred channel multiple (SIMD width, tensor core or texture granularity).
        slow_ops: Operators this device runs slowly, with a note why (drives adaptation passes).
        fast_ops: Operators this device runs well.
        has_fast_layernorm: False where a LayerNorm over channels is a slow reduction on the device.
        max_depthwise_kernel: Largest depthwise kernel the device runs well (None: no limit); the
            adaptation passes shrink larger ones (approximate).
        unsupported_ops: Operators the device cannot run at all, with why; the adaptation passes
            rewrite them or name them in an error (TVM importer gaps common to all devices are
            listed in ``omnic.passes.legalize``).
        int_dot_product: Integer dot-product instruction family, if any (``"vnni"``, ``"dotprod"``).
        int8_depthwise: Whether ``precision="int8"`` quantizes depthwise convs too (False: they
            stay fp32 between integer layers, where int8 depthwise kernels measured slower).
        notes: Free-form notes shown by ``omnic devices``.
    """

    name: str
    description: str
    kind: str
    target: Mapping[str, Any] | str | None
    target_host: Mapping[str, Any] | str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    rpc_key: str = ""
    local: bool = False
    export_format: str = "tar"
    device_api: str = "cpu"
    channel_multiple: int = 8
    slow_ops: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fast_ops: tuple[str, ...] = ()
    has_fast_layernorm: bool = True
    max_depthwise_kernel: int | None = None
    unsupported_ops: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    int_dot_product: str | None = None
    int8_depthwise: bool = True
    notes: str = ""

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly view of the row (for ``omnic devices``).

        ``host``'s target is detected through LLVM, which this module does not load: it is None
        here, and :func:`omnic.compile.target.device_summary` fills it in.
        """
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "target": dict(self.target) if isinstance(self.target, Mapping) else self.target,
            "precisions": list(self.precisions),
            "rpc_key": self.rpc_key,
            "local": self.local,
            "channel_multiple": self.channel_multiple,
            "slow_ops": dict(self.slow_ops),
            "notes": self.notes,
        }


def physical_cores() -> int:
    """Physical cores of this machine (logical ones where psutil cannot tell)."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # psutil missing or /proc unreadable: fall back to logical cores
        return os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """The CPU feature flags ``/proc/cpuinfo`` lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                # x86 calls the line "flags", aarch64 "Features"
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_cpu_features() -> dict[str, bool]:
    """The SIMD features of this CPU that matter for code generation."""
    flags = cpu_flags()
    return {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
    }


def _frozen(d: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(d))


_ANDROID_ARM64_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a78",
                       "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 4}

_DEVICE_ROWS: tuple[DeviceSpec, ...] = (
    DeviceSpec(
        name="host", description="This machine's CPU (features detected by LLVM)", kind="cpu",
        target=None, precisions=("fp32", "fp16", "int8"), rpc_key="host", local=True,
        export_format="so", channel_multiple=16,
        slow_ops=_frozen({"gelu": "erf is a long polynomial on x86",
                          "mish": "softplus+tanh: two transcendental passes"}),
        fast_ops=("conv2d", "dense", "relu", "hardswish"),
        # read off this CPU: int8 convs are packed for VNNI only where vpdpbusd exists (a Zen 3
        # or Skylake host runs them as widening int8 loops instead)
        int_dot_product="vnni" if host_cpu_features()["avx512_vnni"] else None,
        notes="Measured locally. Set TVM_NUM_THREADS (done by omnic from Deployment.threads)."),
    DeviceSpec(
        name="S888", description="Snapdragon 888 CPU (Kryo 680: Cortex-X1/A78/A55), Android aarch64",
        kind="cpu", target=_ANDROID_ARM64_HOST, precisions=("fp32", "fp16", "int8"),
        rpc_key="S888", channel_multiple=8,
        slow_ops=_frozen({"gelu": "erf has no NEON instruction", "silu": "sigmoid needs exp",
                          "mish": "softplus+tanh", "sigmoid": "exp per element",
                          "resize_bilinear": "4 gathers and 3 lerps per output on NEON"}),
        fast_ops=("conv2d", "relu", "relu6", "hardswish"), int_dot_product="dotprod",
        max_depthwise_kernel=5,
        notes="Measured through the RPC tracker (omnic serve on the phone or via the Android RPC app)."),
    DeviceSpec(
        name="S888-gpu", description="Snapdragon 888 GPU (Adreno 660), OpenCL", kind="gpu",
        target="qcom/adreno-opencl", target_host=_ANDROID_ARM64_HOST,
        precisions=("fp32", "fp16"), rpc_key="S888-gpu", device_api="opencl", channel_multiple=4,
        slow_ops=_frozen({"gelu": "erf is slow in OpenCL", "layer_norm": "cross-lane reduction",
                          "softmax": "cross-lane reduction"}),
        fast_ops=("conv2d", "relu", "hardswish"), has_fast_layernorm=False,
        notes="Texture memory holds 4 channels per texel: channel counts in multiples of 4."),
    DeviceSpec(
        name="rasp4b", description="Raspberry Pi 4 Model B (Cortex-A72, aarch64)", kind="cpu",
        target="arm/rasp4b64", precisions=("fp32", "int8"), rpc_key="rasp4b", channel_multiple=4,
        slow_ops=_frozen({"gelu": "erf has no NEON instruction", "silu": "sigmoid needs exp",
                          "mish": "softplus+tanh", "sigmoid": "exp per element",
                          "hardswish": "extra clip pass on an in-order-ish core",
                          "resize_bilinear": "4 gathers and 3 lerps per output on NEON"}),
        fast_ops=("conv2d", "relu", "relu6"), int_dot_product=None, max_depthwise_kernel=3,
        notes="No dot-product instructions on the A72: int8 uses widening multiplies."),
    DeviceSpec(
        name="jetson-orin-nano", description="NVIDIA Jetson Orin Nano (Ampere sm_87, aarch64 host)",
        kind="gpu", target="nvidia/jetson-orin-nano", precisions=("fp32", "fp16", "int8"),
        rpc_key="jetson-orin-nano", device_api="cuda", channel_multiple=8,
        slow_ops=_frozen({"layer_norm": "block reduction without tensor cores"}),
        fast_ops=("conv2d", "dense", "matmul"),
        notes="CUDA source is compiled at load time on the device (NVRTC or nvcc)."),
    DeviceSpec(
        name="a100", description="NVIDIA A100 (Ampere sm_80, x86 host)", kind="gpu",
        target="nvidia/nvidia-a100", target_host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        precisions=("fp32", "fp16", "int8"), rpc_key="a100",
        export_format="so", device_api="cuda", channel_multiple=8,
        fast_ops=("conv2d", "dense", "matmul"),
        notes="Tensor cores want channel counts in multiples of 8 (fp16)."),
)

#: The frozen device table, by name.
DEVICES: Mapping[str, DeviceSpec] = MappingProxyType({d.name: d for d in _DEVICE_ROWS})


def known_devices() -> list[str]:
    """Names of every device in the table."""
    return list(DEVICES)


def get_device(name: str | DeviceSpec) -> DeviceSpec:
    """Look a device up by name.

    Raises:
        UnknownDeviceError: The name is not in the table; the message lists the known ones.
    """
    if isinstance(name, DeviceSpec):
        return name
    try:
        return DEVICES[name]
    except KeyError:
        raise UnknownDeviceError(
            f"unknown device {name!r}; known devices: {', '.join(DEVICES)}. "
            "Run `omnic devices` to see each one's target and precisions.") from None
