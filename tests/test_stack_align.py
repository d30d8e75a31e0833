"""omnic's CPU pipeline keeps vector register spills on aligned stack slots (omnic.compile.stack_align)."""
from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import tirx as T  # noqa: E402

from omnic.compile import stack_align  # noqa: E402

# an AVX-512 target given explicitly: the test reads the assembly, it never runs it, so it holds
# on any x86 host
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
HOST = {"kind": "llvm"}


@T.prim_func
def register_tile(A: T.Buffer((32, 256), "float32"), W: T.Buffer((256, 64), "float32"),
                  C: T.Buffer((32, 64), "float32")):
    # a tuned kernel's shape: per parallel task an 8 x 64 output tile (32 zmm accumulators) kept
    # in registers over the whole reduction, plus the weight vectors and broadcasts: more live
    # vectors than AVX-512 has registers, so LLVM must spill some in the inner loop
    T.func_attr({"global_symbol": "register_tile", "tirx.noalias": True})
    for i0 in T.parallel(4):
        for i in T.unroll(8):
            for j in T.vectorized(64):
                C[i0 * 8 + i, j] = T.float32(0)
        for k in range(256):
            for i in T.unroll(8):
                for j in T.vectorized(64):
                    C[i0 * 8 + i, j] = C[i0 * 8 + i, j] + A[i0 * 8 + i, k] * W[k, j]


def _build(target: dict, pipeline: str):
    mod = tvm.IRModule({"register_tile": register_tile})
    return tvm.tirx.build(mod, tvm.target.Target(target), pipeline=pipeline)


def _spills(asm: str) -> tuple[int, int]:
    """(unaligned, aligned) stores of a zmm register to the stack."""
    unaligned = len(re.findall(r"vmovups\s+%zmm\d+, -?\d*\(%r[sb]p\)", asm))
    aligned = len(re.findall(r"vmovaps\s+%zmm\d+, -?\d*\(%r[sb]p\)", asm))
    return unaligned, aligned


def test_default_pipeline_spills_to_unaligned_slots():
    """The problem the pipeline exists for: TVM's default build of this kernel spills zmm
    registers to 16-byte-aligned slots (if LLVM ever stops doing that, this says so)."""
    asm = _build(AVX512, "default").inspect_source("asm")
    unaligned, _ = _spills(asm)
    assert unaligned > 0
    assert "andq\t$-64, %rsp" not in asm


def test_omnic_pipeline_aligns_every_spill():
    asm = _build(AVX512, stack_align.pipeline_name()).inspect_source("asm")
    unaligned, aligned = _spills(asm)
    assert aligned > 0, "the kernel no longer spills; the test lost its point"
    assert unaligned == 0
    # the parallel task and the compute function both realign their frame
    assert asm.count("andq\t$-64, %rsp") >= 2


def test_omnic_pipeline_computes_the_same_on_this_host():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 256)).astype("float32")
    w = rng.standard_normal((256, 64)).astype("float32")
    lib = _build(HOST, stack_align.pipeline_name())
    dev = tvm.cpu(0)
    c = tvm.runtime.tensor(np.zeros((32, 64), "float32"), dev)
    lib["register_tile"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev), c)
    ref = a @ w
    assert np.abs(c.numpy() - ref).max() / np.abs(ref).max() < 1e-5


def test_an_unaligned_ab_build_is_stored_apart(monkeypatch, tmp_path):
    """OMNIC_ALIGNED_STACK=0 builds another binary: its latencies must not answer for the default."""
    import torch

    from omnic import Deployment, engine
    from omnic.core.ir import trace
    from omnic.oracle import Oracle
    from omnic.oracle.store import LatencyStore

    oracle = Oracle(LatencyStore(tmp_path / "latency.sqlite"), compile_fn=engine.compile)
    traced = trace(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))
    deployment = Deployment(device="host")
    aligned = oracle.key(traced, deployment)
    monkeypatch.setenv(stack_align.ENV_SWITCH, "0")
    assert stack_align.pipeline_for(tvm.target.Target(HOST)) == "default"
    assert oracle.key(traced, deployment) != aligned
