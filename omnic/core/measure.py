"""The measurement protocol shared by local and remote timing, and the oracle interface.

Warm-up, then rounds of repeats until the relative spread of the repeats is small or a cap is
reached. A *repeat* is the fastest of a few back-to-back runs (each run a timed window of at
least ``min_repeat_ms``, so microsecond networks are timed over several calls). Why the fastest:
on a shared machine, interference from other processes only ever adds time, so single runs have
a long slow tail, and a low quantile of a few runs lands near the long-run value far more often
than their median does. The reported latency is the median of the repeats, with its spread, so
callers can tell a real difference from noise. Slow networks get fewer repeats
(``time_budget_s``), never fewer than ``min_repeats``.

A measurement whose spread stays above ``noisy_spread`` (a machine under load) is taken again, up
to ``noisy_retries`` more times; the calmest try is kept, and if even that one is noisy it is
flagged (``Measurement.noisy``) rather than passed off as exact. The 1-minute load average of the
machine that ran the model is recorded with every measurement, so a stored latency says what it
was measured under.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from omnic.core.errors import DeploymentError


#: Bumped when the protocol changes what a measurement reports; the latency store keys carry it,
#: so a value measured under another protocol is never compared with a new one.
#: 2: a repeat is the fastest of a few runs (was: the mean of a >= 40 ms window).
PROTOCOL_REVISION = 2


@dataclass(frozen=True, kw_only=True)
class MeasureConfig:
    """How hard to measure.

    Attributes:
        min_repeat_ms: Each timed run is a window of at least this long (several calls of a
            network faster than that, averaged).
        runs_per_repeat: A repeat is the fastest of this many back-to-back runs (up to 4x as
            many for networks fast enough to afford them within ``time_budget_s``).
        repeats: Repeats per round, at most.
        max_rounds: Rounds at most (each adds up to ``repeats`` repeats).
        target_spread: Stop once (p75 - p25) / median of all repeats is below this.
        time_budget_s: A round is cut to about this long for slow networks (untuned kernels run
            hundreds of ms), keeping at least ``min_repeats`` repeats.
        min_repeats: Repeats per round at least.
        noisy_spread: A measurement whose spread is above this is taken again (0.10: 10 %).
        noisy_retries: How many more times at most; if the spread stays above ``noisy_spread``,
            the calmest try is kept and flagged ``noisy``.
    """

    min_repeat_ms: float = 1.0
    runs_per_repeat: int = 4
    repeats: int = 8
    max_rounds: int = 2
    target_spread: float = 0.03
    time_budget_s: float = 1.0
    min_repeats: int = 3
    noisy_spread: float = 0.10
    noisy_retries: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.noisy_spread, (int, float)) and self.noisy_spread >= 0):
            raise DeploymentError(f"MeasureConfig.noisy_spread must be a fraction >= 0 (0.10 for 10 %), "
                                  f"got {self.noisy_spread!r}")
        if not (isinstance(self.noisy_retries, int) and not isinstance(self.noisy_retries, bool)
                and self.noisy_retries >= 0):
            raise DeploymentError(f"MeasureConfig.noisy_retries must be an int >= 0 (0: never measure "
                                  f"again), got {self.noisy_retries!r}")


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """A latency measurement (or the reason there is none).

    Attributes:
        median_ms: Median of the repeats (each the fastest of a few runs), in ms (None when failed).
        spread: Relative interquartile range of the repeats ((p75 - p25) / median).
        runs: How many repeats the median is over.
        results_ms: The repeats.
        error: Why the measurement failed, or None.
        device: Where it was measured.
        cached: True when the value came from the latency store, not a fresh run.
        load: 1-minute load average of the machine that ran the model, when it could be read
            (a remote server reports it only if it is ``omnic serve``).
        noisy: The spread stayed above ``MeasureConfig.noisy_spread`` after every retry.
        attempts: How many times it was measured (noise retries and, remotely, server faults).
        checked: Whether the measured build's outputs were compared with PyTorch's and agreed
            (for a failed measurement: whether it failed that comparison); False for an
            unchecked build (``check=False``, or a remote device whose outputs are not compared
            here); None where unknown (fakes, rows stored before the check existed).
    """

    median_ms: float | None
    spread: float = 0.0
    runs: int = 0
    results_ms: tuple[float, ...] = field(default_factory=tuple)
    error: str | None = None
    device: str = "host"
    cached: bool = False
    load: float | None = None
    noisy: bool = False
    attempts: int = 1
    checked: bool | None = None

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
                "cached": self.cached, "load": self.load, "noisy": self.noisy, "attempts": self.attempts,
                "checked": self.checked}

    def quality(self) -> dict[str, Any]:
        """What the latency store keeps beside the numbers: load, noise flag and attempts."""
        return {"load": self.load, "noisy": self.noisy, "attempts": self.attempts}


def relative_spread(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    qs = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return float((qs[2] - qs[0]) / med) if med > 0 else 0.0


def local_load() -> float | None:
    """This machine's 1-minute load average (None where the OS does not have one)."""
    try:
        return round(float(os.getloadavg()[0]), 2)
    except (OSError, AttributeError):
        return None


def time_vm(vm, dev, inputs: Sequence[Any], config: MeasureConfig = MeasureConfig(), *,
            device_name: str = "host", func_name: str = "main",
            load_fn: Callable[[], float | None] = local_load) -> Measurement:
    """Time ``vm[func_name](*inputs)`` with the protocol above (works for local and RPC VMs).

    Inputs are set once and the stateful entry point is timed, so argument conversion is not
    part of the number. A try whose spread is above ``config.noisy_spread`` is repeated (at most
    ``config.noisy_retries`` times); the calmest try is returned, flagged ``noisy`` if it is
    still above the threshold.

    Args:
        vm: A Relax VM (local or over RPC).
        dev: The device it runs on.
        inputs: Its arguments, already on ``dev``.
        config: The protocol.
        device_name: Recorded in the Measurement.
        func_name: The function to time.
        load_fn: Reads the load of the machine that runs the model (this one by default; a
            remote runtime passes one that asks the server).
    """
    vm.set_input(func_name, *inputs)
    warm = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=2, min_repeat_ms=0)(func_name)
    run_ms = max(1e-3, float(min(warm.results)) * 1e3)
    affordable_runs = int(1e3 * config.time_budget_s / max(run_ms, config.min_repeat_ms))
    # fast networks take the fastest of more runs (up to 4x) within the time budget, slow ones
    # fewer (down to single runs), so that a round costs about the budget either way
    group = min(4 * config.runs_per_repeat, max(1, affordable_runs // config.repeats))
    group = max(group, min(config.runs_per_repeat, affordable_runs // config.min_repeats))
    per_round = max(config.min_repeats, min(config.repeats, affordable_runs // group))
    evaluator = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=per_round * group,
                                  min_repeat_ms=int(math.ceil(config.min_repeat_ms)) if run_ms < config.min_repeat_ms
                                  else 0)
    best: list[float] = []
    attempts = 0
    for attempts in range(1, config.noisy_retries + 2):
        results: list[float] = []
        for _ in range(config.max_rounds):
            runs = [float(r) * 1e3 for r in evaluator(func_name).results]
            results.extend(min(runs[i:i + group]) for i in range(0, len(runs) - group + 1, group))
            if relative_spread(results) <= config.target_spread:
                break
        if not best or relative_spread(results) < relative_spread(best):
            best = results
        if relative_spread(best) <= config.noisy_spread:
            break
    spread = relative_spread(best)
    return Measurement(median_ms=float(statistics.median(best)), spread=spread, runs=len(best),
                       results_ms=tuple(best), device=device_name, load=load_fn(),
                       noisy=spread > config.noisy_spread, attempts=attempts)


#: ``engine.compile``'s shape: ``compile_fn(traced, deployment, *, check=..., progress=...)`` returns a
#: compiled model with ``measure(config)``, ``runtime``, ``executable``, ``input_shapes`` and
#: ``input_dtypes``. The oracle and the adaptation passes take it as an argument, so neither imports
#: the engine facade.
CompileFn = Callable[..., Any]


class Oracle(Protocol):
    """What searches and adaptation passes need from a latency oracle.

    :class:`omnic.oracle.Oracle` implements it; tests pass fakes (a FLOPs count, a counter).
    Failures come back as a :class:`Measurement` with ``error`` set, not as exceptions.
    """

    def measure(self, model: Any, deployment: Any, example_inputs: Any = None, *,
                config: MeasureConfig | None = None) -> Measurement:
        """Exact latency of ``model`` on the deployment's device."""
        ...

    def measure_many(self, models: Sequence[Any], deployment: Any, example_inputs: Any = None, *,
                     config: MeasureConfig | None = None, batch: Any = None,
                     on_result: Callable[[int, Measurement], None] | None = None) -> list[Measurement]:
        """Exact latency of many models, one Measurement per model, in order."""
        ...
