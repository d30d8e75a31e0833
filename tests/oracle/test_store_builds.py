"""A stored latency answers only for the build a compile would make now.

The regression of the seed's headline API: on a fresh cache, ``get_latency`` without a budget
stored an untuned figure that then answered a request *with* a tuning budget (no tuning happened),
and kept answering untuned requests after tuning had changed what an untuned compile builds.
Real TVM builds, a real tuning database, a real SQLite store.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from omnic import Deployment, engine
from omnic.compile import tuning

# time_defaults=False: these tests are about the records; with the default schedules timed,
# a build keeps a default that a few random trials did not beat (tests/test_tuning_defaults.py)
FAST = tuning.TuningConfig(trials_per_iter=4, population_size=24, genetic_num_iters=1, number=2,
                           min_repeat_ms=5, cost_model="random", time_defaults=False)
X = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1)).eval()


def _rows(oracle):
    return [{**r, "extra": json.loads(r["extra"] or "{}")} for r in oracle.store.rows()]


@pytest.mark.slow
def test_stored_figures_answer_only_for_their_build(fresh_cache):
    model, oracle = _model(), engine.default_oracle()
    untuned = Deployment(device="host")
    tuned = Deployment(device="host", tuning_trials=16)  # one batch for each of the 3 convs

    # 1. no database yet: the default build's figure is stored
    with tuning.using(FAST):
        engine.get_latency(model, untuned, X)
    assert len(_rows(oracle)) == 1
    first = _rows(oracle)[0]
    assert "db=none" in first["context"]

    # 2. with a budget, get_latency tunes first and measures the tuned build
    with tuning.using(FAST):
        engine.get_latency(model, tuned, X)
    rows = _rows(oracle)
    assert len(rows) == 2, "the budgeted request must not be answered by the stored default figure"
    tuned_row = next(r for r in rows if r["context"] != first["context"])
    assert "db=none" not in tuned_row["context"] and "trials=16" in tuned_row["context"]

    # 3. compile with the same budget builds that very build (nothing left to tune)
    with tuning.using(FAST):
        dm = engine.compile(model, tuned, X, progress=False)
    assert dm.report["tuning"]["trials"] == 0
    assert dm.report["schedules"]["tuned"] > 0
    assert tuned_row["extra"]["build_fingerprint"] == dm.report["build_fingerprint"]

    # ... and asking again answers from the store (same database state, same build)
    before = oracle.fresh_measurements
    with tuning.using(FAST):
        engine.get_latency(model, tuned, X)
    assert oracle.fresh_measurements == before

    # 4. an untuned request now gets the build an untuned compile makes (it applies the database)
    with tuning.using(FAST):
        engine.get_latency(model, untuned, X)
    assert oracle.fresh_measurements == before + 1
    rows = _rows(oracle)
    assert len(rows) == 3
    now = next(r for r in rows if r["context"] not in (first["context"], tuned_row["context"]))
    with tuning.using(FAST):
        rebuilt = engine.compile(model, untuned, X, progress=False)
    assert rebuilt.report["schedules"]["tuned"] > 0
    assert now["extra"]["build_fingerprint"] == rebuilt.report["build_fingerprint"]
    assert now["extra"]["build_fingerprint"] != first["extra"]["build_fingerprint"]


@pytest.mark.slow
def test_partly_tuned_build_never_answers_for_a_fully_tuned_one(fresh_cache):
    model, oracle = _model(), engine.default_oracle()
    with tuning.using(FAST):
        # a time budget that ends after the first batch leaves tasks untuned: a partial build
        partial = Deployment(device="host", tuning_trials=16, tuning_time_s=0.01)
        engine.get_latency(model, partial, X)
        partial_row = _rows(oracle)[0]
        assert partial_row["extra"]["schedules"]["tuned"] < sum(partial_row["extra"]["schedules"].values())
        engine.get_latency(model, Deployment(device="host", tuning_trials=16), X)
    rows = _rows(oracle)
    assert len(rows) == 2
    full_row = next(r for r in rows if r["context"] != partial_row["context"])
    assert full_row["extra"]["build_fingerprint"] != partial_row["extra"]["build_fingerprint"]
    assert full_row["extra"]["schedules"]["tuned"] > partial_row["extra"]["schedules"]["tuned"]
