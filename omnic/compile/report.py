"""What a compile did: :class:`CompileReport` and its int8 part, :class:`QuantReport`.

Both are frozen; ``to_dict()`` is the JSON form written to an artifact's ``metadata.json``, and
``report["key"]`` / ``report.get("key")`` read that dict view, so code written against the
dicts these reports used to be keeps working.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping


def plain(value: Any) -> Any:
    """``value`` with every nested report replaced by its ``to_dict()`` and tuples by lists."""
    if hasattr(value, "to_dict"):
        return plain(value.to_dict())
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class _DictView:
    """Read access through the ``to_dict()`` view: ``report["key"]``, ``get``, ``in``, ``keys``,
    and ``dict(report)``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self) -> Any:
        return self.to_dict().keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())


@dataclass(frozen=True, kw_only=True)
class QuantReport(_DictView):
    """How an int8 build was quantized.

    Attributes:
        calibration: Where the scales came from: ``Calibration.summary()`` (method, percentile,
            batches, samples, layers observed, source, integer), or ``{"source": "onnx-qdq",
            "integer": False}`` for an ONNX model that arrived quantized.
        layers: One entry per rewritten conv2d / matmul (op, layer, activation dtype and scale,
            weight shape).
        dot_product: The instruction the packed convs use (``"vpdpbusd"``, ``"sdot"``), if any.
        dot_product_packed_convs: Convs packed for it.
        depthwise: Precision of the depthwise convs (``"int8"`` or ``"fp32"``).
        accuracy: The compiled model against fp32 PyTorch on the kept calibration samples
            (:func:`omnic.compile.quant.accuracy_vs_fp32`; None with too few samples).
        accuracy_checked: Whether that check ran (it needs a local device and a calibration);
            ``to_dict()`` has an ``"accuracy"`` entry only when it did.
    """

    calibration: Mapping[str, Any]
    layers: tuple[Mapping[str, Any], ...] = ()
    dot_product: str | None = None
    dot_product_packed_convs: int = 0
    depthwise: str | None = None
    accuracy: Mapping[str, Any] | None = None
    accuracy_checked: bool = False

    @property
    def source(self) -> str:
        return self.calibration["source"]

    @property
    def integer(self) -> bool:
        return bool(self.calibration["integer"])

    def to_dict(self) -> dict[str, Any]:
        out = {**plain(self.calibration), "layers": plain(self.layers), "dot_product": self.dot_product,
               "dot_product_packed_convs": self.dot_product_packed_convs, "depthwise": self.depthwise}
        if self.accuracy_checked:
            out["accuracy"] = plain(self.accuracy)
        return out


@dataclass(frozen=True, kw_only=True)
class CompileReport(_DictView):
    """What :func:`omnic.engine.compile` built, and how.

    Attributes:
        device: The device's name.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        target: The TVM target, as text.
        structural_hash: The traced model's structural hash.
        source: Where the model came from (``"module"``, ``"onnx"``...).
        input_shapes: The compiled input shapes.
        tuning: What tuning did (a dict, or the tuning report with its own ``to_dict()``).
        kernels_scheduled: Kernels with a schedule (tuned, transferred or default).
        kernels_unscheduled: Kernels built as lowered.
        winograd_convs: Convs the pipeline rewrote into Winograd form.
        ops_precision: Which ops run in which precision.
        prepare_s: Seconds spent lowering and preparing.
        build_s: Seconds spent building.
        max_rel_error: Largest output difference to PyTorch relative to its largest output, on
            the example inputs (None where not checked).
        quantization: The int8 part (None for other precisions, and then absent from ``to_dict()``).
        replay: What applying the tuning database did, one entry per kernel it has records for
            (:class:`omnic.compile.tuning.replay.KernelReplay`): ``"tuned"`` with the rank of the
            record used (0: the best), or ``"fallback"`` when no record replayed on the kernel
            (it keeps its untuned schedule), with the first replay error.
        records_failed_to_replay: Records that did not replay on a kernel of this build (a
            record of another epilogue of the same anchor op), tried now or known from an
            earlier build.
        schedules: How many kernels are ``tuned`` (an exact database record), ``transferred``
            (a tuned schedule of a similar workload, re-fitted), ``default`` (a rule-based
            schedule, no trials) or ``unscheduled`` (a plain loop nest).
        kernel_schedules: ``(kernel, provenance)`` per kernel
            (:func:`omnic.compile.build.kernel_schedules`).
        build_fingerprint: A hash of ``kernel_schedules``: builds of one model with the same
            fingerprint run the same kernels.
        database_state: Digest of the tuning database the build applied
            (:func:`omnic.compile.tuning.state_digest`; ``"none"`` without one).
        transfers: What transfer-tuning did, one entry per kernel the database has no record
            for (:class:`omnic.compile.transfer.KernelTransfer`): ``"transferred"`` with the
            source workload and record, or why not.
    """

    device: str
    precision: str
    target: str
    structural_hash: str
    source: str
    input_shapes: tuple[tuple[int, ...], ...]
    tuning: Any = field(default_factory=dict)
    kernels_scheduled: int = 0
    kernels_unscheduled: int = 0
    winograd_convs: int = 0
    ops_precision: Mapping[str, Any] = field(default_factory=dict)
    prepare_s: float = 0.0
    build_s: float = 0.0
    max_rel_error: float | None = None
    quantization: QuantReport | None = None
    replay: tuple[Any, ...] = ()
    records_failed_to_replay: int = 0
    schedules: Mapping[str, int] = field(default_factory=dict)
    kernel_schedules: tuple[tuple[str, str], ...] = ()
    build_fingerprint: str = ""
    database_state: str = "none"
    transfers: tuple[Any, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.quantization is None:
            del out["quantization"]
        return out
