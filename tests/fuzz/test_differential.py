"""Differential fuzzing against PyTorch: random valid models compiled on host must match eager.

The CI sample (``test_fixed_seed_sample``) draws 30 models with a derandomised hypothesis run;
``benchmarks/bench_fuzz.py`` runs 1,000+. A finding fails with its minimised repro. Known, unfixed
bugs (``known_bugs.py``) are skipped in the sample and checked as strict xfails of their own; fixed
ones are regression tests.
"""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import assume, given, settings

import omnic
from omnic import engine
from omnic.core.ir import trace
from tests.fuzz import generator as gen
from tests.fuzz.known_bugs import FIXED_BUGS, KNOWN_BUGS, known_bug

SAMPLE_SIZE = 30


def test_drawn_specs_are_valid_and_traceable():
    """Every drawn spec runs in eager with the shapes it records, and omnic's tracer accepts it."""
    labels = collections.Counter()
    for seed in range(300):
        spec = gen.draw_spec(gen.RandomDrawer(seed), seed=seed)
        labels.update(spec.labels())
        if seed >= 60:  # coverage is counted over all 300; running them, over the first 60
            continue
        model = gen.build(spec)
        values = [gen.example_input(spec)]
        with torch.no_grad():
            for node, layer in zip(spec.nodes[1:], model.layers):
                values.append(layer(*[values[i] for i in node.inputs]))
                assert tuple(values[-1].shape) == node.shape, gen.describe_spec(spec)
        assert all(torch.isfinite(values[i]).all() for i in spec.outputs)
        if seed < 10:  # fx tracing is the slow part; a few are enough to catch a non-traceable op
            assert trace(model, (gen.example_input(spec),)).gm is not None
    # the op set the issue names is all drawn, at least a few times each in 300 models
    wanted = {"conv:plain", "conv:pointwise", "conv:depthwise", "conv:grouped", "linear", "self_matmul",
              "attention:manual", "attention:sdpa", "batchnorm", "groupnorm", "layernorm", "maxpool",
              "avgpool", "adaptive_avgpool", "upsample:nearest", "upsample:bilinear", "concat", "split",
              "reshape", "transpose_hw", "flatten", "add", "mul", "se"} | {f"act:{a}" for a in gen.ACTIVATIONS}
    assert {w: labels[w] for w in wanted if labels[w] < 3} == {}


def test_same_seed_same_model():
    a, b = (gen.draw_spec(gen.RandomDrawer(11), seed=11) for _ in range(2))
    assert a == b and eval(repr(a), vars(gen)) == a
    xa, xb = gen.build(a)(gen.example_input(a)), gen.build(b)(gen.example_input(b))
    assert torch.equal(xa[0] if isinstance(xa, tuple) else xa, xb[0] if isinstance(xb, tuple) else xb)


def test_minimise_keeps_the_failure_and_drops_the_rest():
    """With a stand-in failure ("has a depthwise conv"), the minimised spec is that conv alone on
    what feeds it, and it still fails."""
    def fails(spec):
        return any(n.label == "conv:depthwise" for n in spec.nodes[1:])

    spec = next(s for s in (gen.draw_spec(gen.RandomDrawer(i), max_nodes=8, seed=i) for i in range(500))
                if fails(s) and len(s.nodes) >= 6 and s.nodes[-1].label != "conv:depthwise")
    small = gen.minimise(spec, fails)
    assert fails(small) and len(small.nodes) < len(spec.nodes)
    assert small.nodes[small.outputs[0]].label == "conv:depthwise" and len(small.outputs) == 1
    gen.build(small)(gen.example_input(small))  # still a valid model


def test_check_classifies_refusals_and_errors(monkeypatch):
    """A typed UnsupportedOperatorError is a refusal, not a finding; anything else is a finding."""
    spec = FIXED_BUGS[0].repro

    def refuse(*_a, **_k):
        raise omnic.UnsupportedOperatorError("no converter for aten.foo: use bar")

    monkeypatch.setattr(engine, "compile", refuse)
    out = gen.check(spec)
    assert out.status == "refused" and not out.finding and "aten.foo" in out.error

    def crash(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "compile", crash)
    out = gen.check(spec)
    assert out.status == "error" and out.finding and "boom" in out.error


def _finding_message(spec: gen.ModelSpec, outcome: gen.Outcome) -> str:
    small = gen.minimise(spec)
    return (f"{outcome.status}: max rel error {outcome.max_rel_error} {outcome.error[:400]}\n"
            f"minimised:\n{gen.describe_spec(small)}\nrepro:\n{gen.repro(small)}")


@pytest.mark.slow
@settings(settings.get_profile("fuzz-ci"), max_examples=SAMPLE_SIZE)
@given(spec=gen.model_specs(max_nodes=6))
def test_fixed_seed_sample(spec):
    """30 derandomised models: each compiles on host and matches PyTorch to 1e-4, or is refused
    with a typed UnsupportedOperatorError."""
    assume(known_bug(spec) is None)
    outcome = gen.check(spec)
    assert not outcome.finding, _finding_message(spec, outcome)


@pytest.mark.parametrize("bug", [pytest.param(b, id=b.name, marks=pytest.mark.xfail(strict=True, reason=b.reason))
                                 for b in KNOWN_BUGS])
def test_known_bug_repro(bug):
    """The minimal repro of each known bug; passes (and so fails the strict xfail) once fixed."""
    assert known_bug(bug.repro) is bug
    outcome = gen.check(bug.repro)
    assert outcome.status == "ok", f"{outcome.status} {outcome.max_rel_error} {outcome.error[:300]}"


@pytest.mark.parametrize("bug", FIXED_BUGS, ids=[b.name for b in FIXED_BUGS])
def test_fixed_bug_repro(bug):
    """The minimal repro of each fixed bug compiles and matches PyTorch, and the CI sample no longer
    skips what it hits (so the fuzzer draws those ops again)."""
    assert known_bug(bug.repro, FIXED_BUGS) is bug and known_bug(bug.repro) is None
    outcome = gen.check(bug.repro)
    assert outcome.status == "ok", f"{outcome.status} {outcome.max_rel_error} {outcome.error[:300]}"


def test_error_floor_spares_cancelled_outputs_not_wrong_ones():
    """Rounding noise on an output that cancels to ~1e-8 passes; a wrong value of the activations'
    size (or a wrong shape, or a NaN) does not."""
    import numpy as np

    e = np.array([-5.4e-9, 2.3e-8, -2.2e-8], dtype=np.float32)  # mean of a LayerNorm output (seed 1935)
    a = np.array([-1.2e-8, 4.1e-9, -8.1e-9], dtype=np.float32)
    assert engine.relative_error([a], [e]) > 0.5  # the unfloored error calls this a mismatch
    assert gen.floored_relative_error([a], [e]) <= gen.TOLERANCE_FP32
    assert gen.floored_relative_error([e + 0.05], [e]) > gen.TOLERANCE_FP32
    ones = np.ones((2, 3), dtype=np.float32)
    assert gen.floored_relative_error([ones * 1.001], [ones]) > gen.TOLERANCE_FP32
    assert gen.floored_relative_error([ones[:1]], [ones]) == float("inf")
    assert gen.floored_relative_error([ones * np.nan], [ones]) == float("inf")
