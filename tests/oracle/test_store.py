"""The latency store: asking again is a lookup (in this process and in another), two writer
processes at once lose nothing, and `host` latencies are kept apart per CPU."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from omnic import Deployment, engine
from omnic.core.errors import DeviceUnreachableError, LeaseTimeoutError
from omnic.core.ir import trace
from omnic.core.measure import MeasureConfig, Measurement
from omnic.oracle import Oracle
from omnic.oracle.store import LatencyStore, StoreKey
from omnic.compile.target import host_cpu_name

QUICK = MeasureConfig(min_repeat_ms=10, repeats=3, max_rounds=1, time_budget_s=0.1)

_MODEL = """
import torch
def small():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1)).eval()
"""

_LOOKUP_CHILD = _MODEL + """
import json, sys
from omnic import engine
from omnic.core.measure import MeasureConfig
from omnic.oracle import Oracle
from omnic.oracle.store import LatencyStore
oracle = Oracle(LatencyStore(sys.argv[1]), MeasureConfig(min_repeat_ms=10, repeats=3, max_rounds=1, time_budget_s=0.1),
                compile_fn=engine.compile)
m = oracle.measure(small(), {"device": "host", "threads": 1}, torch.randn(1, 3, 16, 16))
print(json.dumps({"median_ms": m.median_ms, "cached": m.cached, "fresh": oracle.fresh_measurements}))
"""

_WRITER_CHILD = """
import sys
from omnic.core.measure import Measurement
from omnic.oracle.store import LatencyStore, StoreKey
path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = LatencyStore(path)
print("ready", flush=True)
sys.stdin.readline()  # both writers start at the same moment
for i in range(n):
    for h in (f"{name}-{i}", f"shared-{i}"):  # own rows, and rows the other writer writes too
        store.put(StoreKey(device="host", precision="fp32", input_shape="[[1]]", structural_hash=h),
                  Measurement(median_ms=float(i), runs=1, device="host"))
"""


def _small() -> torch.nn.Module:
    scope: dict = {}
    exec(_MODEL, scope)
    return scope["small"]()


def test_a_measurement_is_looked_up_here_and_in_another_process(tmp_path, fresh_cache):
    model, x = _small(), torch.randn(1, 3, 16, 16)
    deployment = {"device": "host", "threads": 1}
    compiled = engine.compile(model, deployment, x, progress=False)
    assert compiled.report["max_rel_error"] < 1e-4  # what the oracle times computes what torch does

    path = tmp_path / "latency.sqlite"
    oracle = Oracle(LatencyStore(path), QUICK, compile_fn=engine.compile)
    first = oracle.measure(model, deployment, x)
    assert first.ok and not first.cached and oracle.fresh_measurements == 1
    again = oracle.measure(_small(), deployment, x)  # same structure, other weights: same latency
    assert again.cached and again.median_ms == first.median_ms and oracle.fresh_measurements == 1

    child = subprocess.run([sys.executable, "-c", _LOOKUP_CHILD, str(path)], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen == {"median_ms": first.median_ms, "cached": True, "fresh": 0}


def test_two_writer_processes_lose_nothing(tmp_path):
    path, n = tmp_path / "latency.sqlite", 300
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER_CHILD, str(path), name, str(n)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    for w in writers:
        assert w.stdout.readline().strip() == "ready"
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    assert [w.wait(timeout=300) for w in writers] == [0, 0]

    store = LatencyStore(path)
    assert len(store) == 3 * n
    assert {r["structural_hash"] for r in store.rows()} == {
        f"{name}-{i}" for name in ("a", "b", "shared") for i in range(n)}
    last = store.get(StoreKey(device="host", precision="fp32", input_shape="[[1]]", structural_hash=f"b-{n - 1}"))
    assert last is not None and last.cached and last.median_ms == float(n - 1)


def test_host_latencies_are_kept_per_cpu(tmp_path):
    traced = trace(_small(), torch.randn(1, 3, 16, 16))
    deployment = Deployment(device="host")
    oracle = Oracle(LatencyStore(tmp_path / "latency.sqlite"), compile_fn=engine.compile)
    key = oracle.key(traced, deployment)
    here = f"cpu={host_cpu_name()}"
    assert here in key.context
    # a value stored by the same model on another CPU (a cache that moved) must not answer here
    oracle.store.put(dataclasses.replace(key, context=key.context.replace(here, "cpu=another-cpu")),
                     Measurement(median_ms=1.0, runs=1, device="host"))
    assert oracle.lookup(traced, deployment) is None
    oracle.store.put(key, Measurement(median_ms=2.0, runs=1, device="host"))
    assert oracle.lookup(traced, deployment).median_ms == 2.0
    # devices with a fixed target are the same CPU wherever omnic runs: no host CPU in their key
    assert "cpu=" not in oracle.key(traced, Deployment(device="rasp4b")).context


def test_the_injected_compiler_decides_what_a_failure_is(tmp_path):
    """A failing candidate is recorded; a device that cannot be reached is raised, unrecorded."""
    traced = trace(_small(), torch.randn(1, 3, 16, 16))

    def failing(exc: Exception):
        def compile_fn(*_args, **_kwargs):
            raise exc
        return compile_fn

    store = LatencyStore(tmp_path / "latency.sqlite")
    bad = Oracle(store, QUICK, compile_fn=failing(ValueError("no kernel for this op")))
    m = bad.measure(traced, "host")
    assert not m.ok and m.error == "ValueError: no kernel for this op" and bad.fresh_measurements == 1
    # a lease that timed out belongs to this candidate's measurement: recorded like any failure
    lease = Oracle(store, QUICK, compile_fn=failing(LeaseTimeoutError("no server became free")))
    assert lease.measure(traced, "host").error == "LeaseTimeoutError: no server became free"
    gone = Oracle(store, QUICK, compile_fn=failing(DeviceUnreachableError("tracker down")))
    with pytest.raises(DeviceUnreachableError, match="tracker down"):
        gone.measure(traced, "host")
    assert gone.fresh_measurements == 0
