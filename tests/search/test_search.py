"""nas.search with the real oracle on host: measured budgets, infeasibility, resume, seeds,
several deployments; plus unit tests of the search logic with a fake oracle."""
from __future__ import annotations

import json

import pytest
import torch

from omnic import nas
from omnic.core.errors import InfeasibleConstraintError, SearchError
from omnic.core.measure import Measurement
from omnic.search.autonas import EvolutionStrategy, SearchConfig
from omnic.examples.digits import accuracy_fn

SMALL = dict(population=6, parents=3, generations=2, max_measurements=6, verify_per_generation=2,
             calib_batches=2)


class CountingOracle:
    """Wraps the real oracle and counts what the search asks of it."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def measure(self, model, deployment, example_inputs=None):
        self.calls += 1
        return self.inner.measure(model, deployment, example_inputs)


@pytest.fixture(scope="module")
def anchors(trained_supernet, oracle):
    """Measured latency of the smallest and largest subnets (budgets are set between them)."""
    omni, _ = trained_supernet
    lat = {}
    for label, cfg in (("min", omni.canonical(omni.min())), ("max", omni.max())):
        m = oracle.measure(omni.export(cfg).eval(), "host", omni.example_input(cfg))
        assert m.ok, m.error
        lat[label] = m.median_ms
    return lat


def test_search_meets_measured_budget(trained_supernet, digits, calib, oracle, anchors, tmp_path):
    omni, _ = trained_supernet
    budget = anchors["min"] + 0.4 * max(anchors["max"] - anchors["min"], 0.02)
    result = nas.search(omni, {"latency": budget}, deployment={"device": "host"}, score_fn=accuracy_fn(digits[1]),
                        oracle=oracle, calib_loader=calib, **SMALL)
    assert result.latency_ms <= budget
    # the reported latency is the oracle's measurement of exactly this exported subnet
    stored = oracle.lookup(result.model, "host", omni.example_input(result.config))
    assert stored is not None and stored.median_ms == result.latency_ms
    assert 0.5 < result.score <= 1.0
    assert result.measurements <= SMALL["max_measurements"]
    assert all(p["latency_ms"] is not None and p["score"] is not None for p in result.points)
    assert any(p["config"] == result.config for p in result.pareto)
    assert result.pareto == sorted(result.pareto, key=lambda p: p["latency_ms"])
    # the returned subnet carries the BN statistics it was scored with, so its accuracy is the score
    from omnic.search.train import preserved_bn_stats, recalibrate_bn

    x = omni.example_input(result.config)[0]
    with omni.active(result.config), preserved_bn_stats(omni):
        recalibrate_bn(omni, calib, SMALL["calib_batches"])
        with torch.no_grad():
            assert torch.allclose(result.model(x), omni(x), atol=1e-5)
    assert accuracy_fn(digits[1])(result.model) == pytest.approx(result.score)
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["latency_ms"] == result.latency_ms and data["pareto"]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_infeasible_budget_reports_smallest_latency(trained_supernet, digits, oracle, anchors):
    omni, _ = trained_supernet
    with pytest.raises(InfeasibleConstraintError) as info:
        nas.search(omni, {"latency": anchors["min"] / 50}, deployment="host", score_fn=accuracy_fn(digits[1]),
                   oracle=oracle, **SMALL)
    assert info.value.best_latency_ms == pytest.approx(anchors["min"])
    assert "smallest measured latency" in str(info.value)


def test_resume_after_kill_does_not_remeasure_and_reproduces(trained_supernet, digits, calib, oracle, anchors, tmp_path):
    omni, _ = trained_supernet
    budget = anchors["min"] + 0.5 * max(anchors["max"] - anchors["min"], 0.02)
    score = accuracy_fn(digits[1])
    kw = dict(oracle=None, calib_loader=calib, seed=3, **SMALL)

    ref_oracle = CountingOracle(oracle)
    kw["oracle"] = ref_oracle
    reference = nas.search(omni, {"latency": budget}, "host", score, checkpoint_dir=tmp_path / "ref", **kw)

    calls = {"n": 0}

    def dying_score(model):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt("killed mid-search")
        return score(model)

    first = CountingOracle(oracle)
    kw["oracle"] = first
    with pytest.raises(KeyboardInterrupt):
        nas.search(omni, {"latency": budget}, "host", dying_score, checkpoint_dir=tmp_path / "run", **kw)
    assert first.calls >= 2  # it had measured before it died
    second = CountingOracle(oracle)
    kw["oracle"] = second
    resumed = nas.search(omni, {"latency": budget}, "host", score, checkpoint_dir=tmp_path / "run", **kw)
    assert resumed.info["resumed"]
    assert first.calls + second.calls == ref_oracle.calls  # nothing measured twice
    assert resumed.info["score_calls"] + 8 == reference.info["score_calls"]  # nor scored twice
    assert resumed.config == reference.config  # a fixed seed reproduces the search
    assert resumed.latency_ms == reference.latency_ms
    assert [p["config"] for p in resumed.points] == [p["config"] for p in reference.points]


def test_several_deployments_give_one_subnet_each(trained_supernet, digits, oracle, anchors):
    omni, _ = trained_supernet
    budget = anchors["min"] * 3
    deps = [{"device": "host"}, {"device": "host", "threads": 1}]
    results = nas.search(omni, {"latency": budget}, deps, accuracy_fn(digits[1]), oracle=oracle,
                         population=4, parents=2, generations=1, max_measurements=3)
    assert len(results) == 2
    for name, r in results.items():
        assert r.latency_ms <= budget
        assert r.deployment["device"] == "host"
    assert {r.deployment["threads"] for r in results.values()} == {None, 1}


def test_search_errors(trained_supernet, digits, oracle):
    omni, _ = trained_supernet
    with pytest.raises(SearchError):
        nas.search(omni, {"latency": 1.0}, "host", None, oracle=oracle)
    with pytest.raises(SearchError):
        nas.search(omni, {"speed": 1.0}, "host", accuracy_fn(digits[1]), oracle=oracle)
    with pytest.raises(SearchError):
        SearchConfig(population=2, parents=3)


# ------------------------------------------------------------- search logic with a fake oracle
class FlopsOracle:
    """Unit-test stand-in: latency proportional to the subnet's parameter count."""

    def __init__(self):
        self.calls = 0

    def measure(self, model, deployment, example_inputs=None):
        self.calls += 1
        return Measurement(median_ms=sum(p.numel() for p in model.parameters()) / 1e4)


def test_evolution_logic_with_fake_oracle(trained_supernet):
    omni, _ = trained_supernet
    fake = FlopsOracle()
    # score: a smooth function of the configuration, so the best is known
    score = lambda m: sum(omni.space.encode(m.active_config))  # noqa: E731
    budget = omni.cost(omni.max())["params"] / 1e4 * 0.5
    r = nas.search(omni, {"latency": budget}, "host", score, oracle=fake, population=12, parents=4,
                   generations=6, max_measurements=14, seed=0)
    assert r.latency_ms <= budget
    assert fake.calls == r.measurements <= 14
    rnd = nas.search(omni, {"latency": budget}, "host", score, oracle=FlopsOracle(), mode="random",
                     max_measurements=14, seed=0)
    assert rnd.latency_ms <= budget
    assert r.score >= rnd.score
    # cost constraints are exact and honoured
    r2 = nas.search(omni, {"latency": budget, "params": 20000}, "host", score, oracle=FlopsOracle(),
                    population=8, generations=2, max_measurements=6)
    assert r2.cost["params"] <= 20000


def test_strategy_state_roundtrip(trained_supernet):
    omni, _ = trained_supernet
    cfg = SearchConfig(population=5, parents=2, seed=7)
    a = EvolutionStrategy(omni.space, cfg)
    for c in a.ask(lambda c: True):
        a.tell(c, score=len(json.dumps(c)) % 7)
    b = EvolutionStrategy(omni.space, cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.ask(lambda c: True) == b.ask(lambda c: True)


class FailingOracle:
    """Unit-test stand-in: every measurement fails (a subnet that does not build on the device)."""

    def measure(self, model, deployment, example_inputs=None):
        return Measurement(median_ms=None, error="RuntimeError: does not build")


@pytest.fixture(scope="module")
def small_supernet():
    from omnic.examples.digits import DigitsResNet

    torch.manual_seed(0)
    return nas.omnimize(DigitsResNet(width=8), example_inputs=torch.randn(1, 1, 8, 8), divisor=4)


@pytest.mark.parametrize("mode", ["random", "autonas"])
def test_impossible_constraint_raises_infeasible_in_every_mode(small_supernet, mode):
    score = lambda m: sum(small_supernet.space.encode(m.active_config))  # noqa: E731
    # no subnet has a single parameter: the shared feasibility check stops the search
    with pytest.raises(InfeasibleConstraintError):
        nas.search(small_supernet, {"params": 1}, "host", score, oracle=FlopsOracle(), mode=mode,
                   max_measurements=6, seed=0)
    # nothing measures at all: no subnet is verified, so there is no result to return
    with pytest.raises(InfeasibleConstraintError):
        nas.search(small_supernet, {"flops": 1e12}, "host", score, oracle=FailingOracle(), mode=mode,
                   max_measurements=4, population=4, parents=2, generations=1, seed=0)


def test_strategy_factory(small_supernet):
    from omnic.search import FastNASStrategy, RandomStrategy, create_strategy

    assert isinstance(create_strategy("autonas", small_supernet, SearchConfig()), EvolutionStrategy)
    assert isinstance(create_strategy("random", small_supernet, SearchConfig(seed=2)), RandomStrategy)
    with pytest.raises(SearchError, match="mode='fastnas'"):  # an autonas supernet cannot be pruned
        create_strategy("fastnas", small_supernet, None)
    assert FastNASStrategy.kind == "fastnas"
    with pytest.raises(SearchError, match="unknown search mode"):
        create_strategy("genetic", small_supernet, SearchConfig())
