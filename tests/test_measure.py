"""The measurement protocol's statistic: a repeat is the fastest of a few runs, the latency the
median of the repeats, and slow runs (another process on the core) do not move it."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from omnic.core.measure import MeasureConfig, time_vm


class ScriptedVM:
    """Stands in for a Relax VM: ``time_evaluator`` returns per-run times from a script, as TVM's
    own timer would (seconds). The statistic is what is under test, not the timer."""

    def __init__(self, run_ms, seed=0):
        self.run_ms = run_ms
        self.rng = random.Random(seed)
        self.calls = []

    def set_input(self, *_):
        pass

    def time_evaluator(self, name, dev, number, repeat, min_repeat_ms):
        self.calls.append({"repeat": repeat, "min_repeat_ms": min_repeat_ms})

        def run(_func):
            return SimpleNamespace(results=[self.run_ms(self.rng) / 1e3 for _ in range(repeat)])
        return run


def test_slow_runs_do_not_move_the_latency():
    # 30 % of runs are hit by interference (+20-60 %); the device itself takes 10 ms +-1 %
    def run(rng):
        base = 10.0 * (1 + rng.uniform(-0.01, 0.01))
        return base * (1 + rng.uniform(0.2, 0.6)) if rng.random() < 0.3 else base

    values = [time_vm(ScriptedVM(run, seed), None, [], MeasureConfig()).median_ms for seed in range(20)]
    assert all(9.85 <= v <= 10.15 for v in values), values


def test_slow_networks_get_fewer_runs_fast_ones_more():
    slow = ScriptedVM(lambda rng: 300.0)
    m = time_vm(slow, None, [], MeasureConfig())
    timed = slow.calls[1]  # the first call is the warm-up
    assert timed["repeat"] <= 3 * 2 and m.runs >= 3  # about the 1 s budget, at least 3 repeats
    fast = ScriptedVM(lambda rng: 0.5)
    m = time_vm(fast, None, [], MeasureConfig())
    assert fast.calls[1]["repeat"] == 8 * 16 and fast.calls[1]["min_repeat_ms"] == 1  # windows of >= 1 ms
    assert m.runs == 8 and m.median_ms == pytest.approx(0.5)
