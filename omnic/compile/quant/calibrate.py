"""int8 calibration on the fx graph: what each conv2d / linear layer's input ranges over.

:func:`calibrate` runs the fp32 model (BN folded, exactly as :func:`omnic.compile.frontend.lower`
exports it, see :func:`omnic.core.ir.fused_graph`) over the calibration batches with an fx
``Interpreter`` that observes the input of every conv2d and linear layer (min/max, and a
per-batch percentile of ``|x|``). The observers work on the fx graph rather than through
torchao's PT2E flow: torch 2.13 no longer ships ``quantize_pt2e``, and TVM's importer has no
converter for the quantize/dequantize ops that flow produces.

No TVM here: :mod:`omnic.compile.quant.rewrite` turns the statistics into integer kernels.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from omnic.core.errors import QuantizationError, describe
from omnic.core.ir import fused_graph

CALIBRATION_METHODS = ("minmax", "percentile")
DEPTHWISE_CHOICES = ("auto", "int8", "fp32")



@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How a model is quantized to int8.

    Attributes:
        method: ``"minmax"`` (activation range = the observed range) or ``"percentile"`` (range
            = the mean over batches of the ``percentile``-th percentile of ``|x|``; clips rare
            outliers, which usually helps when the calibration set is large).
        percentile: Percentile used by ``"percentile"`` (0 < p <= 100).
        max_batches: Calibration batches used at most (None: all).
        integer: True: int8 x int8 -> int32 kernels; False: simulated quantization
            (dequantize -> fp32), for reference and debugging.
        unsigned_activations: Quantize activations that were never negative during calibration
            to uint8 (scale = max/255) instead of int8 (scale = max/127).
        accuracy_samples: Calibration samples the compiled int8 model is run on to report its
            difference to the fp32 model (0 turns the check off).
        depthwise: Precision of depthwise convs: ``"auto"`` (the device's
            ``DeviceSpec.int8_depthwise``: int8 only where the device's integer path runs them
            faster), ``"int8"`` or ``"fp32"``. A depthwise conv has no channel reduction for a
            dot-product instruction to use.
    """

    method: str = "minmax"
    percentile: float = 99.99
    max_batches: int | None = 64
    integer: bool = True
    unsigned_activations: bool = True
    accuracy_samples: int = 256
    depthwise: str = "auto"

    def __post_init__(self) -> None:
        if self.depthwise not in DEPTHWISE_CHOICES:
            raise QuantizationError(f"QuantConfig.depthwise must be one of {DEPTHWISE_CHOICES}, "
                                    f"got {self.depthwise!r}")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizationError(f"QuantConfig.method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise QuantizationError(f"QuantConfig.percentile must be in (0, 100], got {self.percentile!r}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise QuantizationError(f"QuantConfig.max_batches must be positive or None, got {self.max_batches!r}")

    @classmethod
    def coerce(cls, value: "QuantConfig | dict[str, Any] | str | None") -> "QuantConfig":
        """Accept a QuantConfig, a dict of its fields, a method name, or None (defaults)."""
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, (str, dict)):
            return cls(method=value) if isinstance(value, str) else cls(**value)
        if value is None:
            return cls()
        raise QuantizationError(
            f"quantization must be a QuantConfig, a dict or a method name, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class LayerStats:
    """What calibration learnt about the input of one conv2d / linear layer.

    Attributes:
        name: The fx node (for reports).
        kind: ``"conv2d"`` or ``"linear"``.
        weight: The layer's fp32 weight as PyTorch holds it (after BN folding); used to find
            the layer again in the Relax graph.
        amin: Smallest observed input value.
        amax: Largest observed input value.
        pct: Mean per-batch percentile of ``|x|`` (None unless the method is ``"percentile"``).
    """

    name: str
    kind: str
    weight: np.ndarray
    amin: float
    amax: float
    pct: float | None = None

    def activation_qparams(self, config: QuantConfig) -> tuple[float, str]:
        """``(scale, dtype)`` of this layer's quantized input."""
        unsigned = config.unsigned_activations and self.amin >= 0.0
        bound = self.pct if (config.method == "percentile" and self.pct is not None) else max(abs(self.amin),
                                                                                              abs(self.amax))
        bound = max(float(bound), 1e-8)
        return (bound / 255.0, "uint8") if unsigned else (bound / 127.0, "int8")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        layers: Per-layer statistics, in graph order.
        config: The settings used.
        batches: Calibration batches run.
        samples: Calibration samples run (sum of batch sizes).
        inputs: Up to ``config.accuracy_samples`` calibration samples, per model input (tensors),
            kept to measure the compiled model's difference to fp32.
        reference: The fp32 model's outputs on ``inputs`` (first output only).
        source: Where the data came from (``"calibration"`` or ``"example_inputs"``).
    """

    layers: tuple[LayerStats, ...]
    config: QuantConfig
    batches: int
    samples: int
    inputs: tuple[torch.Tensor, ...] = ()
    reference: torch.Tensor | None = None
    source: str = "calibration"

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description for the compile report."""
        return {"method": self.config.method, "percentile": self.config.percentile if self.config.method ==
                "percentile" else None, "batches": self.batches, "samples": self.samples,
                "layers_observed": len(self.layers), "source": self.source,
                "integer": self.config.integer}


# ------------------------------------------------------------------------------ calibration
_CONV_FUNCS = {torch.nn.functional.conv2d, torch.conv2d}
_LINEAR_FUNCS = {torch.nn.functional.linear}
for _name, _bucket in (("conv2d", _CONV_FUNCS), ("linear", _LINEAR_FUNCS)):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None:
        _bucket.add(_op.default)

def _layer_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Conv2d):
            return "conv2d"
        if isinstance(mod, nn.Linear):
            return "linear"
    elif node.op == "call_function":
        if node.target in _CONV_FUNCS:
            return "conv2d"
        if node.target in _LINEAR_FUNCS:
            return "linear"
    return None


@dataclass
class _Observer:
    kind: str
    weight: np.ndarray | None = None
    amin: float = float("inf")
    amax: float = float("-inf")
    pcts: list[float] = field(default_factory=list)

    def observe(self, x: torch.Tensor, weight: torch.Tensor, percentile: float | None) -> None:
        x = x.detach().float()
        if self.weight is None:
            self.weight = weight.detach().float().numpy().copy()
        self.amin = min(self.amin, float(x.min()))
        self.amax = max(self.amax, float(x.max()))
        if percentile is not None:
            flat = x.abs().flatten()
            if flat.numel() > 1_000_000:  # torch.quantile refuses very large inputs; a sample suffices
                flat = flat[torch.randint(0, flat.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))]
            self.pcts.append(float(torch.quantile(flat, percentile / 100.0)))


class _ObservingInterpreter(fx.Interpreter):
    """Runs the graph and feeds every conv2d/linear input to its observer."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, _Observer], percentile: float | None):
        super().__init__(gm)
        self.observers = observers
        self.percentile = percentile

    def run_node(self, n: fx.Node) -> Any:
        obs = self.observers.get(n)
        if obs is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            weight = self.module.get_submodule(str(n.target)).weight if n.op == "call_module" else args[1]
            obs.observe(args[0], weight, self.percentile)
        return super().run_node(n)


def _batches(calibration: Any, n_inputs: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Normalise a tensor, a DataLoader, or an iterable of batches to tuples of input tensors.

    A batch may be a tensor, or a tuple/list whose first ``n_inputs`` items are the model inputs
    (so ``(images, labels)`` from a labelled DataLoader works as is).
    """
    if isinstance(calibration, (torch.Tensor, np.ndarray)):
        yield (torch.as_tensor(calibration),)
        return
    if isinstance(calibration, (tuple, list)) and calibration and all(
            isinstance(c, (torch.Tensor, np.ndarray)) for c in calibration) and n_inputs > 1 and len(
            calibration) == n_inputs:
        yield tuple(torch.as_tensor(c) for c in calibration)
        return
    try:
        iterator = iter(calibration)
    except TypeError:
        raise QuantizationError(
            f"calibration must be a tensor, a DataLoader or an iterable of batches, got "
            f"{type(calibration).__name__}") from None
    for batch in iterator:
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            yield (torch.as_tensor(batch),)
        elif isinstance(batch, (tuple, list)) and len(batch) >= n_inputs:
            yield tuple(torch.as_tensor(b) for b in batch[:n_inputs])
        elif isinstance(batch, dict):
            raise QuantizationError("calibration batches that are dicts are not supported; yield tensors or "
                                    "(inputs..., label) tuples")
        else:
            raise QuantizationError(f"a calibration batch must be a tensor or a tuple of tensors, got "
                                    f"{type(batch).__name__}")


def calibrate(traced: Any, calibration: Any, config: QuantConfig | None = None, *,
              source: str = "calibration") -> Calibration:
    """Observe the conv2d/linear inputs of ``traced`` on the calibration data.

    Args:
        traced: An :class:`omnic.core.ir.TracedModel` with an fx graph (PyTorch models).
        calibration: A tensor (one batch), a DataLoader, or an iterable of batches (tensors, or
            tuples whose first items are the inputs, e.g. ``(images, labels)``).
        config: Quantization settings.
        source: Recorded in the report (``"example_inputs"`` when no calibration set was given).

    Returns:
        The per-layer statistics plus a few samples and their fp32 outputs for the accuracy check.

    Raises:
        QuantizationError: No fx graph (ONNX input), no batches, or batches of the wrong shape.
    """
    config = config or QuantConfig()
    if traced.gm is None:
        raise QuantizationError(
            "int8 calibration needs a PyTorch model (an fx graph); this model came from "
            f"{traced.source!r}. fix: pass the nn.Module, or an ONNX model without calibration")
    gm = fused_graph(traced.gm)
    observers = {n: _Observer(kind) for n in gm.graph.nodes if (kind := _layer_kind(gm, n)) is not None}
    interp = _ObservingInterpreter(gm, observers, config.percentile if config.method == "percentile" else None)
    n_inputs = len(traced.example_inputs)
    kept: list[list[torch.Tensor]] = [[] for _ in range(n_inputs)]
    refs: list[torch.Tensor] = []
    n_batches = n_samples = 0
    with torch.no_grad():
        for batch in itertools.islice(_batches(calibration, n_inputs), config.max_batches):
            batch = tuple(b.to(e.dtype) for b, e in zip(batch, traced.example_inputs))
            for b, e in zip(batch, traced.example_inputs):
                if tuple(b.shape[1:]) != tuple(e.shape[1:]):
                    raise QuantizationError(
                        f"calibration batch of shape {tuple(b.shape)} does not match the example input "
                        f"{tuple(e.shape)} (all but the batch dimension must agree)")
            try:
                out = interp.run(*batch)
            except Exception as exc:
                raise QuantizationError(f"the model failed on a calibration batch: {describe(exc, 300)}") from exc
            n_batches += 1
            n_samples += int(batch[0].shape[0])
            have = sum(int(k.shape[0]) for k in kept[0])
            if have < config.accuracy_samples:
                take = config.accuracy_samples - have
                for i, b in enumerate(batch):
                    kept[i].append(b[:take].clone())
                first = out[0] if isinstance(out, (tuple, list)) else out
                refs.append(first[:take].detach().clone())
    if n_batches == 0:
        raise QuantizationError("the calibration data yielded no batches")
    layers = tuple(LayerStats(name=n.name, kind=o.kind, weight=o.weight, amin=o.amin, amax=o.amax,
                              pct=(float(np.mean(o.pcts)) if o.pcts else None))
                   for n, o in observers.items() if o.weight is not None)
    inputs = tuple(torch.cat(k) for k in kept) if kept[0] else ()
    return Calibration(layers=layers, config=config, batches=n_batches, samples=n_samples, inputs=inputs,
                       reference=torch.cat(refs) if refs else None, source=source)

