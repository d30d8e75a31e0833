"""The latency store: asking again is a lookup (in this process and in another), two writer
processes at once lose nothing, and `host` latencies are kept apart per CPU."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import warnings

import pytest
import torch

from omnic import Deployment, engine
from omnic.core.errors import CacheWarning, DeviceUnreachableError, LeaseTimeoutError
from omnic.core.ir import trace
from omnic.core.measure import MeasureConfig, Measurement
from omnic.compile.target import host_cpu_name
from omnic.oracle import Oracle
from omnic.oracle.store import LatencyStore, StoreKey
from tests.unprivileged import remove_tree, run_unprivileged, shared_tmpdir

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


# --- broken stores and rows: repaired or ignored, never a raw sqlite3 error ---------------------

KEY = StoreKey(device="host", precision="fp32", input_shape="[[1]]", structural_hash="h")
GOOD = Measurement(median_ms=1.5, spread=0.02, runs=3, results_ms=(1.4, 1.5, 1.6), device="host")


def _cache_warnings(seen) -> list[str]:
    return [str(w.message) for w in seen if issubclass(w.category, CacheWarning)]


def _kept_aside(folder) -> list:
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith("latency.sqlite.corrupt-") and not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize("damage", ["garbage", "wrong_schema"])
def test_a_corrupt_store_is_moved_aside_and_rebuilt(tmp_path, damage):
    path = tmp_path / "latency.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not an sqlite file " * 200)
        (tmp_path / "latency.sqlite-wal").write_bytes(b"and this is no WAL")
    else:  # another program's table under our name: every INSERT would fail
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE measurements (device TEXT, median_ms REAL)")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        store = LatencyStore(path)
        store.put(KEY, GOOD)
        got = store.get(KEY)
    assert got is not None and got.median_ms == 1.5 and len(store) == 1
    (aside,) = _kept_aside(tmp_path)
    assert aside.read_bytes() == before  # kept for the user, untouched
    if damage == "garbage":
        assert (tmp_path / f"{aside.name}-wal").read_bytes() == b"and this is no WAL"
    (message,) = _cache_warnings(seen)  # one warning, naming both files
    assert str(path) in message and str(aside) in message
    with warnings.catch_warnings(record=True) as again:  # the rebuilt store is healthy
        warnings.simplefilter("always")
        assert LatencyStore(path).get(KEY).median_ms == 1.5
    assert _cache_warnings(again) == []


def test_a_store_corrupted_between_calls_is_rebuilt(tmp_path):
    path = tmp_path / "latency.sqlite"
    store = LatencyStore(path)
    store.put(KEY, GOOD)
    store.close()  # the next call opens the file again, as another thread or process would
    path.write_bytes(b"\x00garbage" * 500)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert store.get(KEY) is None  # what was stored is gone: measure again
        store.put(KEY, GOOD)
    assert store.get(KEY).median_ms == 1.5
    assert len(_cache_warnings(seen)) == 1 and len(_kept_aside(tmp_path)) == 1


@pytest.mark.parametrize("column, value", [
    ("median_ms", -5.0), ("median_ms", 0.0), ("median_ms", float("nan")), ("median_ms", float("inf")),
    ("median_ms", "fast"), ("spread", -1.0), ("spread", "wide"), ("runs", "many"), ("runs", -3),
    ("results_ms", "not json"), ("results_ms", '{"a": 1}'), ("results_ms", '[1.0, "x"]'),
    ("results_ms", "[1.0, -2.0]"), ("error", b"\x00blob")])
def test_a_tampered_row_is_treated_as_missing(tmp_path, column, value):
    path = tmp_path / "latency.sqlite"
    store = LatencyStore(path)
    store.put(KEY, GOOD)
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE measurements SET {column}=?", (value,))
    conn.commit()
    conn.close()
    assert store.get(KEY) is None
    # a failure record (no latency, a reason) is valid and comes back as such
    store.put(KEY, Measurement(median_ms=None, error="CompileError: no kernel", device="host"))
    failed = store.get(KEY)
    assert failed is not None and not failed.ok and failed.error == "CompileError: no kernel"


def test_the_oracle_measures_again_over_a_tampered_row(tmp_path):
    traced = trace(_small(), torch.randn(1, 3, 16, 16))
    oracle = Oracle(LatencyStore(tmp_path / "latency.sqlite"), QUICK, compile_fn=engine.compile)
    key = oracle.key(traced, Deployment(device="host", threads=1))
    oracle.store.put(key, Measurement(median_ms=-5.0, runs=1, device="host"))
    m = oracle.measure(traced, {"device": "host", "threads": 1})
    assert m.ok and not m.cached and m.median_ms > 0 and oracle.fresh_measurements == 1
    assert oracle.store.get(key).median_ms == m.median_ms  # the tampered row was replaced


def test_a_read_only_store_answers_reads_and_turns_writes_off():
    base = shared_tmpdir()
    try:
        path, empty = base / "latency.sqlite", base / "empty"
        store = LatencyStore(path)
        store.put(KEY, GOOD)
        store.close()
        empty.mkdir()
        path.chmod(0o444)
        for folder in (empty, base):
            folder.chmod(0o555)
        other = dataclasses.replace(KEY, structural_hash="other")

        def check():
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                ro = LatencyStore(path)
                cached = ro.get(KEY)
                ro.put(other, GOOD)  # off: no error, nothing stored
                ro.put(other, GOOD)
                nothing = LatencyStore(empty / "latency.sqlite")  # no store at all, folder read-only
                nothing.put(KEY, GOOD)
                return {"median": cached.median_ms, "cached": cached.cached, "other": ro.get(other) is None,
                        "read_only": [ro.read_only, nothing.read_only], "len": [len(ro), len(nothing)],
                        "empty": nothing.get(KEY) is None, "warnings": _cache_warnings(seen)}

        seen = run_unprivileged(check)
    finally:
        remove_tree(base)
    assert seen["median"] == 1.5 and seen["cached"] and seen["other"] and seen["empty"]
    assert seen["read_only"] == [True, True] and seen["len"] == [1, 0]
    first, second = seen["warnings"]  # one per store, however many writes were dropped
    assert str(path) in first and "writes are off" in first
    assert str(empty / "latency.sqlite") in second and "writes are off" in second
