"""Never a wrong answer: a build whose outputs differ from PyTorch is refused everywhere.

The wrong build is one we control: TVM's importer is handed a deliberately wrong converter for
``aten.sigmoid`` (it emits ``tanh``), the way a buggy lowering would. Everything else is real: TVM
builds, the SQLite latency store, the oracle and the command line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from tvm import relax

import omnic
from omnic import engine
from omnic.cli.app import main
from omnic.compile import bisect as bisect_mod
from omnic.compile import check as check_mod
from omnic.compile import frontend
from omnic.core.measure import MeasureConfig
from omnic.core.ir import trace
from omnic.oracle import LatencyStore, Oracle

QUICK = MeasureConfig(min_repeat_ms=5, repeats=3, max_rounds=1, time_budget_s=0.05)


class SigmoidNet(nn.Module):
    """Linear -> sigmoid -> Linear: the sigmoid is where the wrong lowering parts from PyTorch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def sigmoid_net() -> nn.Module:
    """Factory for the CLI test (``tests.test_wrong_output:sigmoid_net``)."""
    torch.manual_seed(0)
    return SigmoidNet().eval()


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def wrong_sigmoid(monkeypatch):
    """Make TVM's importer lower aten.sigmoid to tanh (a silent miscompile we control)."""
    real = frontend.from_exported_program

    def wrong(node, importer):
        return importer.block_builder.emit(relax.op.tanh(importer.env[node.args[0]]))

    def patched(ep, **kwargs):
        convert = {**(kwargs.pop("custom_convert_map", None) or {}), "sigmoid.default": wrong}
        return real(ep, **kwargs, custom_convert_map=convert)

    monkeypatch.setattr(frontend, "from_exported_program", patched)


@pytest.fixture
def compiles(monkeypatch):
    """Count the builds engine.compile does (the oracle's compile function is engine.compile)."""
    calls = []
    real = engine.compile

    def counting(*args, **kwargs):
        calls.append(kwargs.get("check", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compile", counting)
    engine._oracle_for.cache_clear()  # the process-wide oracle captured the real compile
    yield calls
    engine._oracle_for.cache_clear()


def _x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 8)


def _rows(cache) -> list[dict]:
    return list(LatencyStore(cache / "latency.sqlite").rows())


# ------------------------------------------------------------------------------------- compile
def test_compile_refuses_a_wrong_build_and_names_the_op(wrong_sigmoid):
    with pytest.raises(omnic.OutputMismatchError) as info:
        engine.compile(sigmoid_net(), "host", _x(), progress=False)
    err = info.value
    assert isinstance(err, omnic.CompileError)
    assert err.max_rel_error > err.tolerance == 1e-4
    assert err.node == "sigmoid" and "sigmoid" in err.op
    text = str(err)
    assert "'sigmoid'" in text and "fc1" in text  # the node, and the last node that still agreed
    assert "check=False" in text  # what to do next


def test_compile_check_false_is_an_explicit_opt_out(wrong_sigmoid):
    dm = engine.compile(sigmoid_net(), "host", _x(), check=False, progress=False)
    assert dm.report["max_rel_error"] is None  # not checked, and says so
    with torch.no_grad():
        assert not torch.allclose(dm(_x()), sigmoid_net()(_x()), atol=1e-3)  # it IS the wrong program


def test_correct_build_passes_the_check():
    dm = engine.compile(sigmoid_net(), "host", _x(), progress=False)
    assert dm.report["max_rel_error"] <= 1e-4


def test_profile_refuses_a_wrong_build(wrong_sigmoid):
    with pytest.raises(omnic.OutputMismatchError, match="sigmoid"):
        engine.profile(sigmoid_net(), "host", _x())


# ------------------------------------------------------------------------------------- latency
def test_get_latency_raises_and_stores_no_latency(fresh_cache, wrong_sigmoid, compiles):
    with pytest.raises(omnic.OutputMismatchError, match="sigmoid"):
        engine.get_latency(sigmoid_net(), "host", _x(), config=QUICK)
    rows = _rows(fresh_cache)
    assert rows and all(r["median_ms"] is None for r in rows)  # the failure, never a latency
    extra = json.loads(rows[0]["extra"])
    assert extra["checked"] is True and extra["mismatch"] is True and extra["max_rel_error"] > 1e-4
    n = len(compiles)
    with pytest.raises(omnic.OutputMismatchError):  # asked again: refused from the store, no build
        engine.get_latency(sigmoid_net(), "host", _x(), config=QUICK)
    assert len(compiles) == n


def test_unchecked_latency_says_so_and_does_not_answer_a_checked_request(fresh_cache, wrong_sigmoid):
    ms = engine.get_latency(sigmoid_net(), "host", _x(), config=QUICK, check=False)
    assert ms > 0
    [row] = _rows(fresh_cache)
    assert json.loads(row["extra"])["checked"] is False
    assert engine.default_oracle().lookup(sigmoid_net(), "host", _x()).checked is False
    with pytest.raises(omnic.OutputMismatchError):  # the unchecked value is not taken as checked
        engine.get_latency(sigmoid_net(), "host", _x(), config=QUICK)
    assert all(r["median_ms"] is None for r in _rows(fresh_cache))  # and the wrong latency is gone


def test_checked_flag_is_cached_with_the_measurement(fresh_cache, compiles):
    first = engine.get_latency(relu_net(), "host", _x(), config=QUICK)
    assert compiles == [True]
    m = engine.default_oracle().lookup(relu_net(), "host", _x())
    assert m.checked is True
    [row] = _rows(fresh_cache)
    extra = json.loads(row["extra"])
    assert extra["checked"] is True and extra["max_rel_error"] <= 1e-4
    assert engine.get_latency(relu_net(), "host", _x(), config=QUICK) == first
    assert compiles == [True]  # the second ask neither compiles nor checks again


def test_an_unchecked_row_is_checked_once_without_measuring_again(fresh_cache, compiles):
    ms = engine.get_latency(relu_net(), "host", _x(), config=QUICK, check=False)
    oracle = engine.default_oracle()
    fresh = oracle.fresh_measurements
    assert engine.get_latency(relu_net(), "host", _x(), config=QUICK) == ms  # checked now, same value
    assert oracle.fresh_measurements == fresh and compiles == [False, True]
    assert oracle.lookup(relu_net(), "host", _x()).checked is True
    engine.get_latency(relu_net(), "host", _x(), config=QUICK)
    assert compiles == [False, True]


# ------------------------------------------------------------------------------------- search
def test_search_oracle_skips_a_wrong_candidate(tmp_path, wrong_sigmoid, compiles):
    oracle = Oracle(LatencyStore(tmp_path / "s.sqlite"), QUICK, compile_fn=engine.compile)
    good, bad = trace(relu_net(), _x()), trace(sigmoid_net(), _x())
    m_good, m_bad = oracle.measure_many([good, bad], "host")
    assert m_good.ok and m_good.checked is True
    assert not m_bad.ok and m_bad.median_ms is None and "OutputMismatchError" in m_bad.error
    assert "sigmoid" in m_bad.error
    n = len(compiles)
    again = oracle.measure_many([good, bad], "host")
    assert len(compiles) == n and again[0].ok and not again[1].ok  # skipped from the store


# ------------------------------------------------------------------------------------- CLI
def test_omnic_compile_exits_non_zero_on_a_wrong_build(wrong_sigmoid, capsys):
    code = main(["compile", "tests.test_wrong_output:sigmoid_net", "--input-shape", "2,8"])
    err = capsys.readouterr().err
    assert code != 0
    assert "outputs differ from PyTorch" in err and "sigmoid" in err
    assert main(["compile", "tests.test_wrong_output:sigmoid_net", "--input-shape", "2,8", "--no-check"]) == 0


# ------------------------------------------------------------------------------------- parts
def test_tolerances_per_precision():
    assert check_mod.tolerance("fp32") == 1e-4
    assert check_mod.tolerance("fp16") == 1e-2
    assert check_mod.tolerance("int8") == 0.1
    e = [np.ones((2, 3), dtype=np.float32)]
    assert check_mod.relative_error([np.ones((2, 2), dtype=np.float32)], e) == float("inf")  # shape
    assert check_mod.relative_error([np.full((2, 3), np.nan, dtype=np.float32)], e) == float("inf")  # NaN
    assert check_mod.relative_error([np.ones((2, 3), dtype=np.float32)], e) == 0.0


def test_bisection_finds_the_first_node_that_parts():
    traced = trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).eval(),
                   _x())
    names = [n.name for n in traced.gm.graph.nodes if n.op == "call_module"]
    built = []

    def wrong_from(k):  # a "compiler" that is right up to node k and wrong from there on
        def run(prefix):
            built.append(prefix)
            last = [n for n in prefix.gm.graph.nodes if n.op == "output"][0].args[0]
            with torch.no_grad():
                out = prefix.gm(*prefix.example_inputs).numpy()
            return [out + 1.0 if names.index(last.name) >= k else out]
        return run

    for k in range(len(names)):
        built.clear()
        found = bisect_mod.first_mismatch(traced, wrong_from(k), tolerance=1e-4)
        assert found is not None and found.node == names[k], (k, found)
        assert len(built) <= 4  # a binary search, not one build per node
    never = bisect_mod.first_mismatch(traced, lambda p: [p.gm(*p.example_inputs).detach().numpy()], tolerance=1e-4)
    assert never is None  # the prefixes do not reproduce it: no node is blamed


# ------------------------------------------------------------------------------------- remote
from tests.rpc_fixtures import FARM_KEY, rpc_farm, rpc_farm_module  # noqa: E402,F401  (fixtures)


def test_remote_build_is_run_once_on_the_server_and_compared(rpc_farm, tmp_path, wrong_sigmoid):
    oracle = Oracle(LatencyStore(tmp_path / "r.sqlite"), QUICK, compile_fn=engine.compile)
    dep = {"device": "host", "tracker": rpc_farm.address, "key": FARM_KEY}
    good = oracle.measure(relu_net(), dep, _x())
    assert good.ok and good.checked is True
    bad = oracle.measure(sigmoid_net(), dep, _x())
    assert not bad.ok and bad.checked is True and "OutputMismatchError" in bad.error
    extras = [json.loads(r["extra"]) for r in oracle.store.rows()]
    assert sorted(e.get("checked_on", "") for e in extras if not e.get("mismatch")) == ["remote"]
    assert [r["median_ms"] for r in oracle.store.rows() if json.loads(r["extra"]).get("mismatch")] == [None]
    rpc_farm.wait_servers(2, timeout_s=30)  # both leases were given back
