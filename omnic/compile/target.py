"""The TVM target of a device: ``tvm.target.Target`` objects and the host CPU as LLVM names it.

:mod:`omnic.core.targets` is the frozen device table and never imports TVM; everything that needs
TVM to turn a row into a target (or LLVM to name this machine's CPU) lives here.
"""
from __future__ import annotations

import functools
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
