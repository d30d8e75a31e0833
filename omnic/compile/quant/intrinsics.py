"""The x86 VNNI tensor intrinsic, fixed for the LLVM that TVM 0.27 bundles.

Kept in a file of its own: TVMScript re-reads this source when the function is parsed.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

_VNNI_REGISTERED = False


def register_vnni_intrinsic() -> None:
    """Make MetaSchedule's ``dot_16x4_vnni`` build with the bundled LLVM 22.

    TVM 0.27 passes ``<16 x i32>`` operands to ``llvm.x86.avx512.vpdpbusd.512``; LLVM 22 wants
    ``<64 x i8>``, so every VNNI candidate fails LLVM verification and tuning silently keeps
    plain code. Tuning int8 kernels on a VNNI CPU, and applying records that replay the
    intrinsic by name, need this registration in the process.
    """
    global _VNNI_REGISTERED
    if _VNNI_REGISTERED:
        return
    import tvm.s_tir.tensor_intrin  # noqa: F401 - lazy: registers every stock intrinsic (CUDA too), which takes seconds; only int8 builds on VNNI need it
    from tvm.s_tir.tensor_intrin.x86 import dot_product_16x4_u8i8i32_desc  # lazy: same package as above

    @T.prim_func(s_tir=True)
    def vnni_impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
                  C: T.Buffer((16,), "int32", offset_factor=1)):
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                              dtype="uint8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), a, B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register("dot_16x4_vnni", dot_product_16x4_u8i8i32_desc, vnni_impl, override=True)
    _VNNI_REGISTERED = True
