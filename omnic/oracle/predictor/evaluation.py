"""How well predicted network latencies match measured ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from omnic.core.errors import PredictorError


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Accuracy of network-latency predictions against measurements.

    Attributes:
        n: Networks evaluated.
        within_10: Share of networks whose prediction is within +-10% of the measured latency.
        rmse_ms: Root mean squared error in ms.
        mape: Mean absolute relative error.
        median_ape: Median absolute relative error.
        rows: ``(key, measured_ms, predicted_ms)`` per network.
    """

    n: int
    within_10: float
    rmse_ms: float
    mape: float
    median_ape: float
    rows: tuple[tuple[str, float, float], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "within_10": self.within_10, "rmse_ms": self.rmse_ms, "mape": self.mape,
                "median_ape": self.median_ape, "rows": [list(r) for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'network':<72} {'measured':>9} {'predicted':>9} {'err':>7}"]
        for key, m, p in self.rows:
            lines.append(f"{key[:72]:<72} {m:>9.3f} {p:>9.3f} {100 * (p - m) / m:>+6.1f}%")
        lines.append(f"held-out networks: {self.n}; within +-10%: {100 * self.within_10:.1f}%; "
                     f"RMSE {self.rmse_ms:.3f} ms; mean |err| {100 * self.mape:.1f}%; "
                     f"median |err| {100 * self.median_ape:.1f}%")
        return "\n".join(lines)


def accuracy(measured: Sequence[float], predicted: Sequence[float], keys: Sequence[str] | None = None) -> Evaluation:
    """Share within +-10%, RMSE and relative errors of predictions against measurements."""
    m = np.asarray(measured, dtype=float)
    p = np.asarray(predicted, dtype=float)
    if m.size == 0:
        raise PredictorError("nothing to evaluate: no measured samples")
    ape = np.abs(p - m) / m
    keys = list(keys) if keys is not None else [str(i) for i in range(m.size)]
    return Evaluation(n=int(m.size), within_10=float(np.mean(ape <= 0.10)),
                      rmse_ms=float(np.sqrt(np.mean((p - m) ** 2))), mape=float(np.mean(ape)),
                      median_ape=float(np.median(ape)),
                      rows=tuple((k, float(a), float(b)) for k, a, b in zip(keys, m, p)))
