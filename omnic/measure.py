"""The measurement protocol shared by local and remote timing.

Warm-up, then rounds of timed repeats (each repeat long enough to swamp timer noise) until the
relative spread of the repeat medians is small or a cap is reached. The median is reported with
its spread, so callers can tell a real difference from noise.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """How hard to measure.

    Attributes:
        min_repeat_ms: Each repeat runs the model enough times to last at least this long.
        repeats: Repeats per round.
        max_rounds: Rounds at most (each adds ``repeats`` repeats).
        target_spread: Stop once (p75 - p25) / median of all repeats is below this.
    """

    min_repeat_ms: float = 40.0
    repeats: int = 5
    max_rounds: int = 3
    target_spread: float = 0.03


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """A latency measurement (or the reason there is none).

    Attributes:
        median_ms: Median of the per-repeat mean latencies, in ms (None when failed).
        spread: Relative interquartile range of the repeats ((p75 - p25) / median).
        runs: How many repeats the median is over.
        results_ms: The per-repeat means.
        error: Why the measurement failed, or None.
        device: Where it was measured.
        cached: True when the value came from the latency store, not a fresh run.
    """

    median_ms: float | None
    spread: float = 0.0
    runs: int = 0
    results_ms: tuple[float, ...] = field(default_factory=tuple)
    error: str | None = None
    device: str = "host"
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.median_ms is not None

    @property
    def noise_ms(self) -> float:
        """Half the interquartile range in ms: differences below this are noise."""
        return 0.0 if self.median_ms is None else 0.5 * self.spread * self.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "spread": self.spread, "runs": self.runs,
                "results_ms": list(self.results_ms), "error": self.error, "device": self.device,
                "cached": self.cached}


def relative_spread(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    qs = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return float((qs[2] - qs[0]) / med) if med > 0 else 0.0


def time_vm(vm, dev, inputs: Sequence[Any], config: MeasureConfig = MeasureConfig(), *,
            device_name: str = "host", func_name: str = "main") -> Measurement:
    """Time ``vm[func_name](*inputs)`` with the protocol above (works for local and RPC VMs).

    Inputs are set once and the stateful entry point is timed, so argument conversion is not
    part of the number.
    """
    vm.set_input(func_name, *inputs)
    evaluator = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=config.repeats,
                                  min_repeat_ms=int(config.min_repeat_ms))
    results: list[float] = []
    for _ in range(config.max_rounds):
        res = evaluator(func_name)
        results.extend(float(r) * 1e3 for r in res.results)
        if relative_spread(results) <= config.target_spread:
            break
    return Measurement(median_ms=float(statistics.median(results)), spread=relative_spread(results),
                       runs=len(results), results_ms=tuple(results), device=device_name)
