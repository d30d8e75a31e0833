"""Keep vector spills of CPU kernels on aligned stack slots.

A tuned kernel whose inner loop needs more vector registers than the CPU has (MetaSchedule's
register tiles often use 28 of AVX-512's 32) spills some of them to the stack. LLVM only gives
those spill slots the vector's alignment when the function realigns its stack, and it decides
that before register allocation, so a function with no aligned local of its own spills to slots
aligned to 16 bytes only. A 64-byte zmm (or 32-byte ymm) slot then crosses a cache line on 3 in
4 stack depths, and the loop slows down markedly. The stack depth at the kernel is set by its
caller (Python frames, the VM, the thread pool) and is randomised per process by ASLR, so the
same binary ran fast in one process and slow in the next, and the tuner's measurement was a
draw of the same lottery.

The fix costs two instructions per call: every parallel task body and every kernel body gets a
64-byte aligned, volatile stack slot, so LLVM realigns the frame up front and every spill slot
in it is aligned too. Used by both the tuner's builder and the final build, so what is tuned is
what runs.
"""
from __future__ import annotations

import os
from typing import Any

#: set to 0 to build with TVM's default pipeline instead (for A/B measurements)
ENV_SWITCH = "OMNIC_ALIGNED_STACK"
PIPELINE_NAME = "omnic_aligned_stack"
ALIGN_BYTES = 64
_registered = False


def _slot(tirx: Any) -> list[Any]:
    lanes = ALIGN_BYTES // 4
    buf = tirx.decl_buffer((1,), f"float32x{lanes}", name="omnic_stack_align", scope="local")
    return [tirx.AllocBuffer(buf, annotations={"tirx.volatile": True}),
            tirx.BufferStore(buf, tirx.Broadcast(tirx.const(0.0, "float32"), lanes), [0])]


def _with_slot(tirx: Any, body: Any) -> Any:
    return tirx.SeqStmt(_slot(tirx) + [body])


def _rewrite(tirx: Any, stmt: Any) -> Any:
    """Rebuild ``stmt`` with a slot at the top of every parallel loop body and compute scope.

    Only the containers that can hold a parallel loop are walked; anything else is returned
    unchanged (a loop nested in an unknown container just keeps LLVM's default frame).
    """
    if isinstance(stmt, tirx.SeqStmt):
        parts = [_rewrite(tirx, s) for s in stmt.seq]
        if all(a.same_as(b) for a, b in zip(parts, stmt.seq)):
            return stmt
        return tirx.SeqStmt(parts)
    if isinstance(stmt, tirx.For):
        body = _rewrite(tirx, stmt.body)
        if stmt.kind == tirx.ForKind.PARALLEL:
            body = _with_slot(tirx, body)
        if body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.AttrStmt):
        body = _rewrite(tirx, stmt.body)
        if stmt.attr_key == "compute_scope":
            body = _with_slot(tirx, body)
        if body.same_as(stmt.body):
            return stmt
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.IfThenElse):
        then_case = _rewrite(tirx, stmt.then_case)
        else_case = None if stmt.else_case is None else _rewrite(tirx, stmt.else_case)
        if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then_case, else_case)
    if isinstance(stmt, tirx.While):
        body = _rewrite(tirx, stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body)
    return stmt


def aligned_stack_pass() -> Any:
    """A TIR pass (run after lowering, on CPU functions) that adds the aligned slots."""
    import tvm  # lazy: omnic.oracle imports this module for enabled(), and TVM costs the CLI seconds
    from tvm import tirx  # lazy: as above

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="OmnicAlignedStack")
    def _pass(func, _mod, _ctx):
        target = func.attrs.get("target") if func.attrs is not None else None
        if target is None or target.kind.name != "llvm":
            return func
        body = _rewrite(tirx, func.body)
        return func if body.same_as(func.body) else func.with_body(body)

    return _pass


def enabled() -> bool:
    """False when ``OMNIC_ALIGNED_STACK=0`` asks for TVM's default pipeline."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def pipeline_for(target: Any) -> str:
    """The TIR pipeline omnic builds ``target`` with: :func:`pipeline_name` for CPU (LLVM)
    targets, TVM's default for the rest (a GPU build's kernels are not LLVM functions)."""
    return pipeline_name() if target.kind.name == "llvm" else "default"


def pipeline_name() -> str:
    """Register (once) and return the name of the TIR pipeline with aligned stacks.

    It is TVM's default S-TIR pipeline with :func:`aligned_stack_pass` after the host
    finalisation; pass the name as ``tir_pipeline`` to ``tvm.compile`` or as ``pipeline`` to
    ``tvm.tirx.build``. With ``OMNIC_ALIGNED_STACK=0`` in the environment it is ``"default"``
    (TVM's own pipeline), to measure what the alignment changes.
    """
    global _registered
    if not enabled():
        return "default"
    if not _registered:
        import tvm  # lazy: omnic.oracle imports this module for enabled(), and TVM costs the CLI seconds
        from tvm.tirx import compilation_pipeline  # lazy: as above

        def factory(**kwargs):
            lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("s_tir", **kwargs)

            def finalize_host_aligned():
                # after LowerTVMBuiltin, which would turn the slot into a heap workspace
                return tvm.transform.Sequential([finalize_host(), aligned_stack_pass()])

            return lower, finalize_host_aligned, finalize_device

        compilation_pipeline.register_tir_pipeline(PIPELINE_NAME, factory)
        _registered = True
    return PIPELINE_NAME
