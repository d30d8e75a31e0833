"""The TVM target of a device: ``tvm.target.Target`` objects and the host CPU as LLVM names it.

:mod:`omnic.core.targets` is the frozen device table and never imports TVM; everything that needs
TVM to turn a row into a target (or LLVM to name this machine's CPU) lives here.
"""
from __future__ import annotations

import functools
import platform
from types import MappingProxyType
from typing import Any, Mapping

import tvm
from tvm.target import codegen

from omnic.core.targets import DeviceSpec, cpu_flags, physical_cores


@functools.lru_cache(maxsize=None)
def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``znver5``, ``icelake-server``, ...), as host builds use it.

    TVM rejects ``mcpu=native``, so LLVM's own host detection supplies a concrete name; codegen
    then uses AVX-512/VNNI where the CPU has them. Where LLVM does not know the CPU, the x86-64
    level its flags reach stands in.
    """
    cpu = str(codegen.llvm_get_system_cpu())
    triple = str(codegen.llvm_get_system_triple())
    if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, triple):
        return cpu
    return "x86-64-v4" if cpu_flags() >= {"avx512f", "avx512bw"} else "x86-64-v3"


def host_target_dict(num_threads: int | None) -> dict[str, Any]:
    """The LLVM target dict for this machine's CPU."""
    # opt-level 2: LLVM's O3 spends minutes vectorising the naive loops of untuned kernels, for
    # the same latency
    return {"kind": "llvm", "mcpu": host_cpu_name(), "opt-level": 2,
            "num-cores": int(num_threads or physical_cores())}


def tvm_target(spec: DeviceSpec, num_threads: int | None = None) -> tvm.target.Target:
    """Build the ``tvm.target.Target`` for a device.

    Args:
        spec: The device's row in the table.
        num_threads: Threads the compiled code will use (``num-cores`` for CPU targets, which
            MetaSchedule requires). Defaults to the machine's core count for ``host``.

    Returns:
        A ``tvm.target.Target`` with its host attached where the device needs one.
    """
    target = host_target_dict(num_threads) if spec.target is None else spec.target
    if isinstance(target, Mapping):
        target = dict(target)
        if target.get("kind") == "llvm" and num_threads is not None:
            target["num-cores"] = int(num_threads)
    tgt = tvm.target.Target(target)
    if spec.target_host is not None:
        host = dict(spec.target_host) if isinstance(spec.target_host, Mapping) else spec.target_host
        tgt = tvm.target.Target(tgt, host=tvm.target.Target(host))
    return tgt


def device_summary(spec: DeviceSpec) -> dict[str, Any]:
    """:meth:`DeviceSpec.summary` with ``host``'s target filled in as detected on this machine."""
    summary = spec.summary()
    if spec.target is None:
        summary["target"] = host_target_dict(None)
    return summary


#: The instruction-set extensions compiled tensor code can contain, by LLVM's name, with the flag
#: ``/proc/cpuinfo`` lists for each (x86 ``flags``, aarch64 ``Features``). An artifact records the
#: ones its build enabled, and a local load refuses a build needing one this CPU lacks (it would
#: stop with SIGILL). Only these are compared: LLVM's per-CPU lists also hold system extensions
#: (``rdseed``, ``shstk``, ``movdir64b``, ...) that kernels never use and that virtual machines
#: often hide, so comparing those would refuse builds made on this very machine.
ISA_FEATURES: Mapping[str, str] = MappingProxyType({
    # x86
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    # aarch64
    "neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2",
})

#: Other spellings of an architecture name, as ``platform.machine()`` and LLVM triples write them.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalize_arch(arch: str) -> str:
    """One spelling per architecture (``arm64`` -> ``aarch64``, ``AMD64`` -> ``x86_64``)."""
    arch = arch.lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    """This machine's architecture, spelled as LLVM triples spell it."""
    return normalize_arch(platform.machine())


def cpu_record(target: tvm.target.Target) -> dict[str, Any] | None:
    """The CPU a build's code needs: architecture, triple, ``mcpu`` and the ISA features it enables.

    For GPU targets this is the host side (the CPU that launches the kernels). ``None`` where the
    target has no LLVM part.
    """
    llvm = target if target.kind.name == "llvm" else target.host
    if llvm is None or llvm.kind.name != "llvm":
        return None
    triple = str(llvm.attrs.get("mtriple") or codegen.llvm_get_system_triple())
    mcpu = llvm.attrs.get("mcpu")
    enabled = set(codegen.llvm_get_cpu_features(llvm))
    return {"arch": normalize_arch(triple.split("-", 1)[0]), "triple": triple,
            "mcpu": None if mcpu is None else str(mcpu),
            "features": sorted(f for f in enabled if f in ISA_FEATURES)}


@functools.lru_cache(maxsize=None)
def host_isa_features() -> frozenset[str]:
    """The :data:`ISA_FEATURES` this CPU has, by LLVM's name.

    Read from ``/proc/cpuinfo``, which reports what the CPU (or the virtual machine) really offers;
    where it cannot be read, LLVM's feature list for the host CPU name stands in.
    """
    flags = cpu_flags()
    if flags:
        return frozenset(name for name, flag in ISA_FEATURES.items() if flag in flags)
    llvm = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu_name()})
    return frozenset(f for f in codegen.llvm_get_cpu_features(llvm) if f in ISA_FEATURES)
