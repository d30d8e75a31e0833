"""Vectorizable ``exp``, ``erf`` and ``sigmoid`` for the default CPU schedules.

LLVM lowers TIR's fp32 ``exp`` and ``erf`` to a libm call per element, which no schedule can
vectorize: a softmax spends most of its time in ``expf`` and a GELU epilogue in ``erff``. TVM's
``topi.fast_exp`` and ``topi.fast_erf`` compute the same functions with a polynomial made of
vector instructions (relative error about 1e-7 for exp, absolute about 1e-7 for erf); this
module swaps them into a kernel's blocks before it is scheduled. The formulas are taken from
TVM itself (a one-element TE compute of each), not restated here.
"""
from __future__ import annotations

import functools

import tvm
import tvm.ir.prim.expr as prim
from tvm import s_tir, te, tirx, topi
from tvm.ir.expr import TensorLoad

#: the TIR intrinsics replaced, with the TOPI function that computes each
FAST_FUNCTIONS = {"tirx.exp": topi.fast_exp, "tirx.erf": topi.fast_erf}
#: how the replaced intrinsics print in TVMScript (a body without any is left alone); a sigmoid
#: becomes ``1 / (1 + exp(-x))`` with the fast ``exp`` (TVM lowers it so later, with libm's)
_SCRIPT_NAMES = ("T.exp(", "T.erf(", "T.sigmoid(")
_BINARY = (prim.Add, prim.Sub, prim.Mul, prim.Div, prim.Max, prim.Min, prim.FloorDiv, prim.FloorMod,
           prim.Mod, prim.LShift, prim.RShift, prim.BitwiseAnd, prim.BitwiseOr, prim.BitwiseXor)


@functools.cache
def _template(op_name: str):
    """TOPI's fp32 formula for ``op_name`` as an expression of a one-element buffer load."""
    a = te.placeholder((1,), "float32", name="a")
    func = te.create_prim_func([a, FAST_FUNCTIONS[op_name](a)])
    found = []

    def visit(stmt):
        if isinstance(stmt, s_tir.SBlockRealize):
            if stmt.block.name_hint != "root":
                found.append(stmt.block.body.value)
            else:
                visit(stmt.block.body)
        elif hasattr(stmt, "body"):
            visit(stmt.body)

    visit(func.body)
    if len(found) != 1:
        raise RuntimeError(f"unexpected TE lowering of {op_name}")
    return found[0]


def _rebuild(expr, on_call, on_load):
    """``expr`` rebuilt bottom-up; ``on_call(call, args)`` / ``on_load(load)`` may replace calls
    and loads. None when ``expr`` holds a node this rebuilder does not know."""
    if isinstance(expr, tvm.ir.expr.Call):
        args = [_rebuild(a, on_call, on_load) for a in expr.args]
        if any(a is None for a in args):
            return None
        replaced = on_call(expr, args)
        if replaced is not None:
            return replaced
        if all(a.same_as(b) for a, b in zip(args, expr.args)):
            return expr
        return tirx.op.call_intrin(expr.ty.dtype, expr.op, *args)
    for cls in _BINARY:
        if isinstance(expr, cls):
            a, b = _rebuild(expr.a, on_call, on_load), _rebuild(expr.b, on_call, on_load)
            return None if a is None or b is None else cls(a, b)
    if isinstance(expr, prim.Cast):
        value = _rebuild(expr.value, on_call, on_load)
        return None if value is None else prim.Cast(expr.ty.dtype, value)
    if isinstance(expr, prim.Select):
        parts = [_rebuild(e, on_call, on_load) for e in (expr.condition, expr.true_value, expr.false_value)]
        return None if any(p is None for p in parts) else prim.Select(*parts)
    if isinstance(expr, TensorLoad):
        return on_load(expr)
    if isinstance(expr, (prim.FloatImm, prim.IntImm, prim.Var)):
        return expr
    return None


def fast(op_name: str, x):
    """TOPI's vectorizable fp32 ``op_name`` (``"tirx.exp"`` or ``"tirx.erf"``) of ``x``."""
    value = _rebuild(_template(op_name), lambda call, args: None, lambda load: x)
    if value is None:
        raise RuntimeError(f"cannot rebuild TOPI's formula of {op_name}")
    return value


def _swap(expr):
    def on_call(call, args):
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        if str(call.ty.dtype) != "float32":
            return None
        if name in FAST_FUNCTIONS:
            return fast(name, args[0])
        if name == "tirx.sigmoid":
            one = tirx.const(1.0, "float32")
            return prim.Div(one, prim.Add(one, fast("tirx.exp", prim.Sub(tirx.const(0.0, "float32"), args[0]))))
        return None

    if not any(name in expr.script() for name in _SCRIPT_NAMES):
        return expr

    return _rebuild(expr, on_call, lambda load: load)


def use_fast_math(sch: s_tir.Schedule, blocks) -> int:
    """Replace fp32 ``exp`` / ``erf`` / ``sigmoid`` in the bodies of ``blocks`` by TOPI's
    polynomials.

    Returns how many blocks changed. A block whose body this module cannot rebuild is left as
    it is (still correct, only slower).
    """
    changed = 0
    for block in blocks:
        stmt = sch.get(block)
        body = stmt.body
        if not isinstance(body, tirx.BufferStore):
            continue
        text = body.value.script()
        if not any(name in text for name in _SCRIPT_NAMES):
            continue
        value = _swap(body.value)
        if value is None:
            continue
        new_block = s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint,
                                 tirx.BufferStore(body.buffer, value, body.indices), stmt.init,
                                 stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
        sch.state.replace(sch.get_sref(block), new_block, {stmt: new_block})
        changed += 1
    return changed
