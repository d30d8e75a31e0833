"""Hypothesis settings for the fuzzer's CI sample.

The session's cache root is fresh (``tests/conftest.py``), so every model is compiled untuned with
the default schedules, never with a tuning database left by another run.
"""
from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

# Derandomised: CI draws the same models every run, so a red run reproduces. No shrinking phase:
# each example is a TVM build (about a second), and generator.minimise does the shrinking on the
# spec, a node at a time, with a repro printed. No example database: nothing outside the session.
settings.register_profile(
    "fuzz-ci", derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
