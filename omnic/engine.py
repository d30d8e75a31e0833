"""The engine: compile, measure and profile a model for a deployment.

``compile(model, deployment, example_inputs)`` traces with torch.fx, lowers to TVM Relax,
tunes (when the deployment asks for it), builds, and checks the compiled outputs against PyTorch.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

from omnic.compile import bisect, build, frontend, pipeline, quant, tuning, winograd
from omnic.compile.check import output_error, tolerance
from omnic.compile.check import reference_outputs, relative_error  # noqa: F401 - public as engine.*
from omnic.compile.quant import Calibration
from omnic.compile.report import CompileReport, QuantReport
from omnic.compile.runtime import DeviceModel, attach_hint
from omnic.compile.target import tvm_target
from omnic.core.cache import cache_root
from omnic.core.deployment import Deployment
from omnic.core.errors import DeviceUnreachableError, MeasurementError, OutputMismatchError
from omnic.core.ir import TracedModel, resolve_example_inputs, trace
from omnic.core.measure import MeasureConfig
from omnic.oracle import LatencyStore, Oracle


def _coerce(model: Any, deployment: Any, example_inputs: Any) -> tuple[TracedModel, Deployment]:
    deployment = Deployment.coerce(deployment)
    if isinstance(model, TracedModel) and example_inputs is None:
        return model, deployment
    inputs = resolve_example_inputs(example_inputs, deployment) if example_inputs is not None else None
    return trace(model, inputs), deployment


def _quantize(traced: TracedModel, mod: Any, spec: Any, target: Any, calibration: Any, quantization: Any,
              applies_db: bool) -> tuple[Any, Calibration | None, dict[str, Any]]:
    """int8: calibrate (PyTorch models) or accept the model's own QDQ scales (ONNX), then prepare.

    Returns:
        ``(prepared module, calibration or None, the rewrite's report)``.
    """
    calib = None
    if traced.source == "onnx":  # already quantized (QDQ) by its exporter: nothing to calibrate
        quant.require_onnx_qdq(traced.onnx_path)
    else:
        calib = quant.calibrate(traced, traced.example_inputs if calibration is None else calibration,
                                quant.QuantConfig.coerce(quantization),
                                source="example_inputs" if calibration is None else "calibration")
    q_report: dict[str, Any] = {}
    prepared = pipeline.prepare(mod, spec, target, "int8", quantization=calib or quant.ONNX_QDQ,
                                quant_report=q_report)
    if q_report.get("dot_product_packed_convs") and q_report.get("dot_product") == "vpdpbusd" and applies_db:
        # tuning tensorizes the packed convs with VNNI, and applying such records replays the
        # intrinsic by name: both need it registered (and fixed for LLVM 22) in this process
        quant.register_vnni_intrinsic()
    return prepared, calib, q_report


def _quant_report(dm: DeviceModel, calib: Calibration | None, q_report: dict[str, Any],
                  check_accuracy: bool) -> QuantReport:
    summary = calib.summary() if calib is not None else {"source": "onnx-qdq", "integer": False}
    checked = calib is not None and check_accuracy
    return QuantReport(calibration=summary, layers=tuple(q_report.get("layers", [])),
                       dot_product=q_report.get("dot_product"),
                       dot_product_packed_convs=q_report.get("dot_product_packed_convs", 0),
                       depthwise=q_report.get("depthwise"), accuracy_checked=checked,
                       accuracy=quant.accuracy_vs_fp32(dm, calib) if checked else None)


def compile(model: Any, deployment: Any = None, example_inputs: Any = None, *, check: bool = True,
            database: Any = None, progress: bool = True, calibration: Any = None,
            quantization: Any = None) -> DeviceModel:
    """Compile ``model`` for ``deployment``.

    Args:
        model: ``nn.Module``, ``fx.GraphModule``, ``ExportedProgram``, ``.onnx`` path or TracedModel.
        deployment: ``Deployment``, the equivalent dict, or a device name (default ``host``).
        example_inputs: A tensor or tuple of tensors shaped like one real batch.
        check: On a local device, run once on the example inputs and compare with PyTorch: the
            difference goes into ``report["max_rel_error"]``, and beyond the precision's
            tolerance (:data:`omnic.compile.check.TOLERANCES`) the build is refused. False skips
            the check (``max_rel_error`` stays None): an explicit opt-out.
        database: A MetaSchedule database to apply instead of the device's persistent one.
        progress: Show tuning progress.
        calibration: int8 only: calibration data (a tensor, a DataLoader, or an iterable of
            batches; ``(inputs, labels)`` batches are fine). Default: the example inputs, which
            gives the right kernels but poorly calibrated scales.
        quantization: int8 only: a :class:`omnic.compile.quant.QuantConfig`, a dict of its fields or
            a calibration method name (``"minmax"``, ``"percentile"``).

    Returns:
        A :class:`DeviceModel` (callable, timeable, exportable); its ``report`` is a
        :class:`omnic.compile.report.CompileReport`.

    Raises:
        OutputMismatchError: ``check`` found the compiled outputs differ from PyTorch's; the
            message names the first fx node where they part (found by building prefixes of the
            graph), or the ops whose lowering is suspect.
    """
    t0 = time.perf_counter()
    traced, deployment = _coerce(model, deployment, example_inputs)
    spec = deployment.spec
    target = tvm_target(spec, num_threads=deployment.threads)
    mod = frontend.lower(traced)
    calib, q_report = None, None
    db_dir = tuning.database_dir(deployment, target)
    applies_db = (deployment.tuning_trials > 0 or bool(deployment.tuning_time_s) or database is not None
                  or (db_dir / "database_workload.json").exists())
    if deployment.precision == "int8":
        prepared, calib, q_report = _quantize(traced, mod, spec, target, calibration, quantization, applies_db)
    else:
        # Winograd for builds that apply tuned kernels with a budget that reaches them (or a
        # database that holds them); an untuned build keeps the direct convolutions, which are
        # what the untuned-latency predictor models
        use_winograd = applies_db and winograd.wanted(deployment, db_dir)
        prepared = pipeline.prepare(mod, spec, target, deployment.precision, winograd=use_winograd)
    t_prepare = time.perf_counter() - t0
    tuning_report: Any = {"trials": 0, "tasks": 0, "new_tasks": 0}
    database_given = database
    if database is None:
        database, tuning_report = tuning.database_for(prepared, deployment, target, progress=progress)
    # read after tuning: the state of the database this build applies (a caller's own database
    # is not the device's: its builds are not keyed by the device's state)
    db_state = tuning.state_digest(db_dir) if database_given is None else "given"
    t1 = time.perf_counter()
    # replay failures are remembered next to the device's database (not next to a caller's own)
    built = build.build_result(prepared, spec, target, database,
                               failures_dir=db_dir if database_given is None else None,
                               judge_records=tuning.current().time_defaults)
    executable, final_mod = built.executable, built.module
    scheduled, unscheduled = build.scheduled_kernels(final_mod)
    schedules = build.kernel_schedules(final_mod)
    report = CompileReport(
        device=spec.name, precision=deployment.precision, target=str(target),
        structural_hash=traced.structural_hash, source=traced.source,
        input_shapes=tuple(tuple(s) for s in traced.input_shapes), tuning=tuning_report,
        kernels_scheduled=len(scheduled), kernels_unscheduled=len(unscheduled),
        winograd_convs=winograd.count_convs(prepared),
        ops_precision={"float32" if deployment.precision == "fp32" else deployment.precision: "all"},
        prepare_s=round(t_prepare, 3), build_s=round(time.perf_counter() - t1, 3),
        replay=built.replay, records_failed_to_replay=built.records_failed_to_replay,
        schedules=build.schedule_counts(schedules), kernel_schedules=schedules,
        build_fingerprint=build.build_fingerprint(schedules), database_state=db_state,
        transfers=built.transfers)
    dm = DeviceModel(executable=executable, deployment=deployment, input_shapes=traced.input_shapes,
                     input_dtypes=traced.input_dtypes, output_is_tuple=traced.output_is_tuple,
                     structural_hash=traced.structural_hash, report=report, module=final_mod)
    # a remote device's outputs are not compared here (the build stays unchecked: max_rel_error None)
    local = check and spec.local and not deployment.is_remote
    if local:
        error, tol = output_error(dm, traced), tolerance(deployment.precision)
        if not error <= tol:
            run_prefix = functools.partial(_prefix_outputs, deployment=deployment, database=database,
                                           calibration=calibration, quantization=quantization)
            raise bisect.mismatch_error(traced, error, tolerance=tol, precision=deployment.precision,
                                        device=spec.name, run_prefix=run_prefix)
        report = dataclasses.replace(report, max_rel_error=error)
    if q_report is not None:
        report = dataclasses.replace(report, ops_precision=quant.ops_precision(q_report),
                                     quantization=_quant_report(dm, calib, q_report, local))
    dm.report = report
    return dm


def _prefix_outputs(prefix: TracedModel, *, deployment: Deployment, database: Any, calibration: Any,
                    quantization: Any) -> list[Any]:
    """Build a graph prefix the way the refused build was built (same database, no new tuning) and
    run it on its example inputs: one probe of the bisection that localises a mismatch."""
    if database is None:
        deployment = deployment.replace(tuning_trials=0, tuning_time_s=None)
    dm = compile(prefix, deployment, check=False, database=database, progress=False, calibration=calibration,
                 quantization=quantization)
    out = dm(*prefix.example_inputs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _require_measurable(deployment: Deployment) -> None:
    if not deployment.spec.local and not deployment.is_remote:
        raise DeviceUnreachableError(attach_hint(deployment))


@functools.lru_cache(maxsize=None)
def _oracle_for(path: str) -> Oracle:
    return Oracle(LatencyStore(path), compile_fn=compile)


def default_oracle() -> Oracle:
    """The process-wide oracle: the store ``<cache root>/latency.sqlite``, compiling with :func:`compile`.

    One per cache root (the root is read on each call, so a changed ``OMNIC_CACHE_DIR`` gets its own).
    """
    return _oracle_for(str(cache_root() / "latency.sqlite"))


def get_latency(model: Any, deployment: Any = None, example_inputs: Any = None, *,
                config: MeasureConfig | None = None, check: bool = True) -> float:
    """Measured latency of ``model`` on the deployment's device, in ms (median of repeats).

    Uses the latency store: a model (same structure, shapes, device, precision) measured before
    is not measured again. The build is checked against PyTorch first (once per structural hash:
    the store remembers it), and a wrong program's latency is never measured nor stored.

    Args:
        model: As for :func:`compile`.
        deployment: As for :func:`compile`.
        example_inputs: As for :func:`compile`.
        config: The measurement protocol (default: the oracle's).
        check: False measures without comparing the outputs (an explicit opt-out); the stored
            value then says ``"checked": false`` and does not answer a later checked request.

    Raises:
        OutputMismatchError: The compiled outputs differ from PyTorch's (see :func:`compile`).
        MeasurementError: Compiling or measuring failed otherwise.
        DeviceUnreachableError: The device is neither this machine nor attached through a tracker.
        UnsupportedOperatorError: An operator the compiler cannot lower (named, with a workaround).
        MeasurementError: Building or running the model failed.
    """
    traced, deployment = _coerce(model, deployment, example_inputs)
    _require_measurable(deployment)
    measurement = default_oracle().measure(traced, deployment, config=config, check=check)
    if not measurement.ok:
        prefix = f"{OutputMismatchError.__name__}: "
        if measurement.error and measurement.error.startswith(prefix):  # refused, maybe from the store
            raise OutputMismatchError(measurement.error[len(prefix):])
        raise MeasurementError(f"measuring on {deployment.device} failed: {measurement.error}")
    return float(measurement.median_ms)


def profile(model: Any, deployment: Any = None, example_inputs: Any = None, *, runs: int = 10,
            print_table: bool = False, check: bool = True):
    """Per-kernel latency table, FLOPs, parameters, parameter and peak activation bytes.

    Args:
        check: Compare the build's outputs with PyTorch first (see :func:`compile`); False opts out.

    Returns:
        A :class:`omnic.compile.profiler.Profile` (a dict that prints as a table).

    Raises:
        OutputMismatchError: The compiled outputs differ from PyTorch's: a wrong program is not profiled.
    """
    from omnic.compile import profiler

    traced, deployment = _coerce(model, deployment, example_inputs)
    _require_measurable(deployment)
    dm = compile(traced, deployment, check=check, progress=False)
    measurement = dm.measure()
    runtime = dm.runtime
    inputs = [runtime.to_device(a) for a in dm.random_inputs()]
    kernels = runtime.kernel_times(inputs, runs=runs) if hasattr(runtime, "kernel_times") else \
        profiler.kernel_times(runtime.vm, runtime.dev, inputs, runs=runs)
    params, param_bytes = profiler.parameter_stats(traced)
    result = profiler.Profile(
        device=deployment.device, precision=deployment.precision, structural_hash=traced.structural_hash,
        latency_ms=measurement.median_ms, latency_spread=measurement.spread,
        flops=profiler.count_flops(traced), params=params, param_bytes=param_bytes,
        peak_activation_bytes=profiler.peak_activation_bytes(traced), kernels=kernels,
        tuning=dm.report["tuning"])
    if print_table:
        print(result.table())
    return result
