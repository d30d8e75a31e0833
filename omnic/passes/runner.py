"""The runner: apply passes in order, naming the failing pass and those that ran before it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from omnic.core.errors import OmnicError, PassError, describe
from omnic.core.targets import DeviceSpec
from omnic.passes.base import PassFn, PassReport
from omnic.passes.registry import get_pass


@dataclass(frozen=True, kw_only=True)
class PassRun:
    """The result of :func:`run_passes`: the rewritten graph and one report per pass."""

    gm: fx.GraphModule
    reports: tuple[PassReport, ...] = field(default_factory=tuple)


def run_passes(gm: fx.GraphModule, spec: DeviceSpec, passes: Sequence[str | PassFn]) -> PassRun:
    """Apply ``passes`` in order.

    Args:
        gm: A traced graph (shapes recorded); it is not modified.
        spec: The device the passes adapt to.
        passes: Pass names (see :func:`~omnic.passes.registry.registered_passes`) or pass functions.

    Returns:
        The final graph and the reports, in order.

    Raises:
        PassError: A pass raised; the message names it and the passes that ran before it.
            Typed omnic errors from a pass (an operator no pass can legalise) keep their type.
    """
    done: list[str] = []
    reports: list[PassReport] = []
    current = gm
    for item in passes:
        fn = get_pass(item).fn if isinstance(item, str) else item
        name = item if isinstance(item, str) else getattr(item, "pass_name", getattr(item, "__name__", "pass"))
        try:
            current, report = fn(current, spec)
            current.graph.lint()
        except OmnicError as exc:
            if isinstance(exc, PassError) or type(exc) is OmnicError:
                raise PassError(f"pass {name!r} failed (after {done or 'no passes'}): {exc}") from exc
            raise  # already typed and actionable (UnsupportedOperatorError...)
        except Exception as exc:  # noqa: BLE001 - any bug in a pass is reported with its context
            raise PassError(f"pass {name!r} failed (after {done or 'no passes'}): {describe(exc)}") from exc
        reports.append(report)
        done.append(name)
    return PassRun(gm=current, reports=tuple(reports))
