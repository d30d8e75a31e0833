"""Small schedule queries the rules share."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from tvm import s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV

#: ``IterVar.iter_type`` values of spatial and reduction block iterators
SPATIAL, REDUCTION = 0, 2


def extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """The loop's extent if it is a constant, else None."""
    value = sch.get(loop).extent
    return int(value) if hasattr(value, "value") or isinstance(value, int) else None


def iter_kinds(sch: s_tir.Schedule, block: SBlockRV) -> list[int]:
    """The block's iterator kinds (:data:`SPATIAL`, :data:`REDUCTION`, ...), in loop order."""
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    return REDUCTION in iter_kinds(sch, block)


def lanes_for(length: int, cap: int) -> int | None:
    """The widest vector of 16, 8 or 4 lanes (at most ``cap``) that divides ``length``."""
    return next((n for n in (16, 8, 4) if n <= cap and length % n == 0), None)


def applied_variants(sch: s_tir.Schedule, block: SBlockRV, apply: Callable[..., bool],
                     settings: Iterable[dict[str, Any]]) -> list[s_tir.Schedule]:
    """A copy of ``sch`` per entry of ``settings`` on which ``apply(copy, block, **entry)`` succeeded.

    ``apply`` returns False (or raises) where a setting does not fit the block's shape; that
    variant is left out of the design space instead of failing the whole task.
    """
    variants = []
    for kwargs in settings:
        candidate = sch.copy()
        try:
            if apply(candidate, block, **kwargs):
                variants.append(candidate)
        except Exception:  # noqa: BLE001 - a shape this variant does not fit
            continue
    return variants
