"""``nas.adapt``: rewrite a model for a device, keeping each rewrite only where it measurably helps.

    adapted = nas.adapt(model, {"device": "host"}, torch.randn(1, 3, 64, 64))
    print(adapted.adapt_report.table())

The passes propose; the latency oracle (exact compiled latency on the device) decides. A
candidate rewrite is kept when the measured latency drops by more than the noise of the two
measurements (half their interquartile ranges, added). Approximate swaps are tried only with
``approximate=True``, and never beyond ``tolerance`` (relative output change on the example input).

The oracle and the compiler are arguments, not imports: this module sits below the facades
(:func:`omnic.nas.adapt` passes the process-wide oracle and ``engine.compile``), so it can be
driven with any store or a stub in tests.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from omnic.compile.runtime import attach_hint
from omnic.core.deployment import Deployment
from omnic.core.errors import DeploymentError, DeviceUnreachableError, MeasurementError, PassError
from omnic.core.ir import TracedModel, resolve_example_inputs, trace
from omnic.core.measure import CompileFn, MeasureConfig, Measurement, Oracle, relative_spread
from omnic.passes.base import EXAMPLE_INPUTS_META, PassReport, copy_graph_module
from omnic.passes.registry import DEFAULT_PASSES, get_pass
from omnic.passes.runner import run_passes

#: Relative output change above which an "exact" rewrite is treated as broken (float rounding
#: of folded weights stays orders of magnitude below this).
EXACT_RTOL = 1e-4
_APPLIED = ("kept", "required", "applied (unmeasured)")
_UNMEASURED = Measurement(median_ms=None, error="not measured (measure=False)")


@dataclass(frozen=True, kw_only=True)
class AdaptStep:
    """One pass tried by :func:`adapt`.

    Attributes:
        name: The pass.
        status: ``kept``, ``required`` (legalisation, always applied), ``rejected: ...``,
            ``no match`` (nothing to rewrite), ``off: approximate`` (needs ``approximate=True``).
        nodes_changed: Nodes the pass rewrote.
        exact: Whether the pass is exact.
        why: Why the pass applies (or not) to the device.
        before_ms / after_ms: Measured latency before and with the rewrite (median).
        before_noise_ms / after_noise_ms: Half the interquartile range of those measurements.
        max_abs_diff / max_rel_diff: Output change of the candidate against the original model
            on the example input (rel: divided by the largest output magnitude).
        paired_ms: ``(before, after)`` medians of the back-to-back re-check of a candidate the
            oracle found faster (None when there was no re-check).
        notes: Details from the pass.
    """

    name: str
    status: str
    nodes_changed: tuple[str, ...] = ()
    exact: bool = True
    why: str = ""
    before_ms: float | None = None
    after_ms: float | None = None
    before_noise_ms: float | None = None
    after_noise_ms: float | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    paired_ms: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AdaptReport:
    """What :func:`adapt` tried, measured and kept. Prints as a table; ``to_dict()`` / ``json()``
    for machines; ``report["final_ms"]`` reads a field of the dict view.

    Attributes:
        device / precision: The deployment.
        input_shapes: Example input shapes.
        steps: One :class:`AdaptStep` per pass, in the order tried.
        original_ms / original_noise_ms: The unmodified model (None if it cannot compile).
        final_ms / final_noise_ms: The adapted model.
        max_abs_diff / max_rel_diff: Output change of the adapted model on the example input.
        exact: True when every kept rewrite is exact.
    """

    device: str
    precision: str
    input_shapes: tuple[tuple[int, ...], ...]
    steps: tuple[AdaptStep, ...] = ()
    original_ms: float | None = None
    original_noise_ms: float | None = None
    final_ms: float | None = None
    final_noise_ms: float | None = None
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    exact: bool = True

    @property
    def kept(self) -> list[str]:
        """Names of the passes whose rewrites are in the adapted model."""
        return [s.name for s in self.steps if s.status.startswith(_APPLIED) and s.nodes_changed]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kept"] = self.kept
        return data

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def table(self) -> str:
        """A plain-text table: pass, nodes, exact, before/after ms (+- noise), output change, status."""

        def ms(v: float | None, noise: float | None) -> str:
            return "-" if v is None else f"{v:.3f}±{(noise or 0):.3f}"

        def diff(v: float | None) -> str:
            return "-" if v is None else f"{v:.1e}"

        head = f"{'pass':<24}{'nodes':>6}  {'kind':<7}{'before ms':>17}{'after ms':>17}{'max rel diff':>13}  status"
        lines = [f"nas.adapt on {self.device} ({self.precision}), input {', '.join(map(str, self.input_shapes))}",
                 head, "-" * len(head)]
        for s in self.steps:
            lines.append(f"{s.name:<24}{len(s.nodes_changed):>6}  {'exact' if s.exact else 'approx':<7}"
                         f"{ms(s.before_ms, s.before_noise_ms):>17}{ms(s.after_ms, s.after_noise_ms):>17}"
                         f"{diff(s.max_rel_diff):>13}  {s.status}")
        lines.append("-" * len(head))
        lines.append(f"original {ms(self.original_ms, self.original_noise_ms)} ms -> adapted "
                     f"{ms(self.final_ms, self.final_noise_ms)} ms; kept: {', '.join(self.kept) or 'nothing'}; "
                     f"output max rel diff {self.max_rel_diff:.1e} ({'exact' if self.exact else 'approximate'})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _outputs(gm: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    return [o.detach() for o in (out if isinstance(out, (tuple, list)) else [out])]


def _diff(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    abs_d = max(float((a.double() - e.double()).abs().max()) for a, e in zip(actual, expected))
    scale = max(float(e.abs().max()) for e in expected) or 1.0
    return abs_d, abs_d / scale


def adapt(model: Any, deployment: Any = None, example_inputs: Any = None, *, oracle: Oracle | None = None,
          compile_fn: CompileFn | None = None, exact_only: bool = False,
          approximate: bool = False, tolerance: float = 0.05,
          passes: Sequence[str] | None = None, config: MeasureConfig | None = None,
          measure: bool = True, confirm: bool = True,
          progress: Callable[[str], None] | None = None) -> fx.GraphModule:
    """Adapt ``model`` to the deployment's device, keeping rewrites that measurably lower latency.

    Args:
        model: An ``nn.Module``, ``fx.GraphModule`` or :class:`~omnic.core.ir.TracedModel`.
        deployment: ``Deployment``, dict or device name (default ``host``); must be measurable
            (this machine, or a device attached through a tracker).
        example_inputs: A tensor or tuple of tensors (outputs are compared on them, and the
            LayerNorm -> BatchNorm swap calibrates on them).
        exact_only: Try exact passes only, and reject any rewrite that changes the outputs
            by more than float rounding. Cannot be combined with ``approximate``.
        approximate: Also try the approximating swaps (off by default).
        oracle: The latency oracle (its ``measure(model, deployment, config=...)``); needed
            when ``measure`` is True. :func:`omnic.nas.adapt` passes the process-wide one.
        compile_fn: Compiles a graph for the back-to-back re-check; needed when ``measure`` and
            ``confirm`` are True. :func:`omnic.nas.adapt` passes ``engine.compile``.
        tolerance: Largest relative output change (max |diff| / max |output|) an approximate
            swap may cause on the example input; beyond it the swap is rejected unmeasured.
        passes: Pass names to try, in order (default :data:`omnic.passes.DEFAULT_PASSES`).
        config: Measurement protocol for fresh measurements.
        measure: False proposes without measuring (for a device with no tracker attached): every
            rewrite that changes something and passes the accuracy checks is applied and marked
            ``unmeasured``. The default keeps only what the oracle shows to be faster.
        confirm: Re-check a candidate the oracle finds faster by timing it and the current
            model back to back, alternating (stored measurements of the two can be minutes apart,
            and on a shared machine the load changes in between). Kept only if both agree.
        progress: Called with one line per step (the CLI prints them).

    Returns:
        The adapted ``fx.GraphModule``; its ``adapt_report`` is an :class:`AdaptReport`.

    Raises:
        DeploymentError: ``exact_only`` and ``approximate`` together.
        DeviceUnreachableError: ``measure=True`` for a device that is neither this machine nor
            attached through a tracker.
        UnsupportedOperatorError: An operator the device cannot run and no pass can rewrite.
        MeasurementError: The (legalised) model cannot be compiled or measured.
        PassError: A pass failed (names it and the passes before it).
        TypeError: ``measure`` without an ``oracle``, or ``confirm`` without a ``compile_fn``.
    """
    if exact_only and approximate:
        raise DeploymentError("exact_only and approximate contradict each other: pick one")
    if measure and oracle is None:
        raise TypeError("adapt(measure=True) needs oracle=...; omnic.nas.adapt passes the default oracle")
    if measure and confirm and compile_fn is None:
        raise TypeError("adapt(measure=True, confirm=True) needs compile_fn=...; omnic.nas.adapt passes "
                        "engine.compile")
    deployment = Deployment.coerce(deployment)
    spec = deployment.spec
    say = progress or (lambda _msg: None)
    if measure and not spec.local and not deployment.is_remote:
        # fail before tracing and compiling anything (the oracle would only find out after a build)
        raise DeviceUnreachableError(attach_hint(deployment) + " (or pass measure=False / --no-measure "
                                     "to see the proposed rewrites unmeasured)")
    if isinstance(model, TracedModel) and example_inputs is None:
        traced = model
    else:
        traced = trace(model, resolve_example_inputs(example_inputs, deployment))
    if traced.gm is None:
        raise PassError("nas.adapt rewrites PyTorch graphs; an ONNX file has none: pass the nn.Module")
    inputs = traced.example_inputs
    reference = _outputs(traced.gm, inputs)
    names = list(passes or DEFAULT_PASSES)
    infos = [get_pass(n) for n in names]

    def measure_graph(gm: fx.GraphModule) -> Measurement:
        if not measure:
            return _UNMEASURED
        return oracle.measure(trace(gm, inputs), deployment, config=config)

    current = copy_graph_module(traced.gm)
    current.meta[EXAMPLE_INPUTS_META] = inputs
    steps: list[AdaptStep] = []
    done: list[str] = []

    # 1. legalisation: what the device cannot run at all is rewritten before anything is measured
    required = [i for i in infos if i.required]
    for info in required:
        current, rep = _run_one(current, spec, info.name, done)
        if rep.changed:
            done.append(info.name)
        steps.append(AdaptStep(name=info.name, status="required" if rep.changed else "no match",
                               nodes_changed=rep.nodes_changed, exact=rep.exact, why=rep.why, notes=rep.notes))
    original = oracle.measure(traced, deployment, config=config) if measure else _UNMEASURED
    legalised = any(s.nodes_changed for s in steps)
    base = measure_graph(current) if legalised else original
    if measure and not base.ok:
        raise MeasurementError(f"cannot measure the model on {spec.name}: {base.error}")
    if measure:
        say(f"baseline on {spec.name}: {base.median_ms:.3f} ms (noise {base.noise_ms:.3f} ms)")
    if legalised:
        abs_d, rel_d = _diff(_outputs(current, inputs), reference)
        steps = [replace(s, after_ms=base.median_ms, after_noise_ms=base.noise_ms,
                         before_ms=original.median_ms if original.ok else None,
                         before_noise_ms=original.noise_ms if original.ok else None,
                         max_abs_diff=abs_d, max_rel_diff=rel_d) for s in steps]

    # 2. one candidate per pass, measured, kept only if faster beyond noise
    for info in infos:
        if info.required:
            continue
        candidate, rep = _run_one(current, spec, info.name, done)
        common = dict(name=info.name, nodes_changed=rep.nodes_changed, exact=rep.exact, why=rep.why,
                      notes=rep.notes, before_ms=base.median_ms, before_noise_ms=base.noise_ms)
        if not rep.changed:
            steps.append(AdaptStep(status="no match", **common))
            continue
        if not rep.exact and not approximate:
            steps.append(AdaptStep(status="off: approximate (approximate=True to try)", **common))
            continue
        abs_d, rel_d = _diff(_outputs(candidate, inputs), reference)
        common.update(max_abs_diff=abs_d, max_rel_diff=rel_d)
        if rep.exact and rel_d > EXACT_RTOL:
            steps.append(AdaptStep(status=f"rejected: exact pass changed outputs (rel {rel_d:.1e})", **common))
            continue
        if not rep.exact and rel_d > tolerance:
            steps.append(AdaptStep(status=f"rejected: output moved {rel_d:.2g} > tolerance {tolerance:g}", **common))
            continue
        if not measure:
            current = candidate
            done.append(info.name)
            steps.append(AdaptStep(status="applied (unmeasured)", **common))
            say(f"{info.name}: {len(rep.nodes_changed)} nodes: applied (unmeasured)")
            continue
        m = measure_graph(candidate)
        if not m.ok:
            steps.append(AdaptStep(status=f"rejected: does not compile/measure ({m.error})", **common))
            continue
        gain, noise = base.median_ms - m.median_ms, base.noise_ms + m.noise_ms
        common.update(after_ms=m.median_ms, after_noise_ms=m.noise_ms)
        if gain > noise and confirm:
            pa, pb = _paired(compile_fn, current, candidate, inputs, deployment, config)
            common.update(paired_ms=(pa.median_ms, pb.median_ms))
            pgain, pnoise = pa.median_ms - pb.median_ms, pa.noise_ms + pb.noise_ms
            if pgain <= pnoise:
                steps.append(AdaptStep(status=f"rejected: back-to-back re-check not faster beyond noise "
                                              f"({pa.median_ms:.3f} -> {pb.median_ms:.3f} ms, ±{pnoise:.3f})", **common))
                say(f"{info.name}: oracle {common['before_ms']:.3f} -> {m.median_ms:.3f} ms, re-check "
                    f"{pa.median_ms:.3f} -> {pb.median_ms:.3f} ms: rejected")
                continue
        if gain > noise:
            paired = common.get("paired_ms")
            status = "kept" + (f" (re-check {paired[0]:.3f} -> {paired[1]:.3f} ms)" if paired else "")
            current, base = candidate, m
            done.append(info.name)
        else:
            status = f"rejected: {'slower' if gain < 0 else 'not faster'} beyond noise ({gain:+.3f} ms vs ±{noise:.3f})"
        steps.append(AdaptStep(status=status, **common))
        say(f"{info.name}: {len(rep.nodes_changed)} nodes, {common['before_ms']:.3f} -> {m.median_ms:.3f} ms: {status}")

    current.meta.pop(EXAMPLE_INPUTS_META, None)
    abs_d, rel_d = _diff(_outputs(current, inputs), reference)
    report = AdaptReport(
        device=spec.name, precision=deployment.precision, input_shapes=tuple(tuple(t.shape) for t in inputs),
        steps=tuple(steps), original_ms=original.median_ms if original.ok else None,
        original_noise_ms=original.noise_ms if original.ok else None, final_ms=base.median_ms,
        final_noise_ms=base.noise_ms, max_abs_diff=abs_d, max_rel_diff=rel_d,
        exact=all(s.exact for s in steps if s.status.startswith(_APPLIED) and s.nodes_changed))
    current.adapt_report = report
    return current


def _paired(compile_fn: CompileFn, a: fx.GraphModule, b: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
            deployment: Deployment, config: MeasureConfig | None,
            rounds: int = 3) -> tuple[Measurement, Measurement]:
    """Time ``a`` and ``b`` alternately (a, b, a, b, ...) so both see the same machine load."""
    dms = [compile_fn(trace(g, inputs), deployment) for g in (a, b)]
    runs: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, dm in enumerate(dms):
            runs[i].extend(dm.measure(config or MeasureConfig(max_rounds=1)).results_ms)
    out = []
    for r in runs:
        r = sorted(r)
        out.append(Measurement(median_ms=r[len(r) // 2], spread=relative_spread(r), runs=len(r),
                               results_ms=tuple(r), device=deployment.device))
    return out[0], out[1]


def _run_one(gm: fx.GraphModule, spec: Any, name: str, done: list[str]) -> tuple[fx.GraphModule, PassReport]:
    """Run one pass with the runner's error wrapping, naming the passes already applied (``done``)."""
    try:
        run = run_passes(gm, spec, [name])
    except PassError as exc:
        raise PassError(f"{exc} [passes applied before it: {', '.join(done) or 'none'}]") from exc
    return run.gm, run.reports[0]
