"""Remote devices through TVM's RPC tracker: a real tracker and two real servers on loopback.

The "device" is this machine registered under the key ``host`` (compiled for ``host``), so
remote results can be checked against local ones and against PyTorch.
"""
from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import omnic
from omnic import engine
from omnic.compile import build
from omnic.compile.runtime import LocalRuntime
from omnic.core.errors import DeviceUnreachableError
from omnic.core.measure import MeasureConfig
from omnic.oracle import LatencyStore, Oracle
from omnic.remote import runner as rpc_runner
from omnic.remote.batch import BatchConfig
from omnic.remote.farm import free_port
from omnic.remote.tracker import TrackerClient, connect_tracker
from tests.rpc_fixtures import FARM_KEY, rpc_farm, rpc_farm_module  # noqa: F401  (fixtures)

# Short measurements: these tests check plumbing and fault handling, not the numbers.
QUICK = MeasureConfig(min_repeat_ms=10, repeats=3, max_rounds=1, time_budget_s=0.1)


class TwoConv(nn.Module):
    """A tiny candidate; ``width`` makes structurally distinct ones."""

    def __init__(self, width: int = 8, heads: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.fc = nn.Linear(width, 5)
        self.aux = nn.Linear(width, 3) if heads else None

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))).mean(dim=(2, 3))
        return (self.fc(h), self.aux(h).sigmoid()) if self.aux is not None else self.fc(h)


class Heavy(nn.Module):
    """Seconds per run as plain loop nests (built without the default schedules): stands in for a
    kernel that hangs."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(128, 128, 3, padding=1) for _ in range(6)])

    def forward(self, x):
        return self.convs(x)


X = torch.randn(1, 3, 16, 16)


def _deployment(farm, **extra):
    return {"device": "host", "tracker": farm.address, "key": FARM_KEY, **extra}


def _model(width: int, heads: bool = False) -> nn.Module:
    torch.manual_seed(width)
    return TwoConv(width, heads).eval()


# ------------------------------------------------------------------------ remote = local
@pytest.mark.slow
def test_remote_inference_and_latency_match_local_and_pytorch(rpc_farm, tmp_path):
    model = _model(8, heads=True)  # a tuple output: read back through get_outputs over RPC
    dm = engine.compile(model, _deployment(rpc_farm), X, check=False)
    try:
        out = dm(X)
        with torch.no_grad():
            ref = model(X)
        assert isinstance(out, tuple) and len(out) == 2
        for o, r in zip(out, ref):
            assert o.shape == r.shape
            assert torch.allclose(o, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()) + 1e-6)
        # The very same artifact run here gives the same numbers as on the device.
        local = LocalRuntime(dm.executable)
        local_out = local.vm["main"](local.to_device(X.numpy()))
        for o, lo in zip(out, local_out):
            np.testing.assert_allclose(o.numpy(), lo.numpy(), rtol=1e-6, atol=1e-7)
        assert dm.runtime.server in rpc_farm_servers(rpc_farm)

        remote = dm.measure(QUICK)
        here = local.measure([X.numpy()], QUICK, "host")
        assert remote.ok and remote.device == "host" and remote.runs >= 3
        # One server thread there, two threads here, CPUs shared with other work: the same order
        # of magnitude is what can be asserted.
        assert 0.1 < remote.median_ms / here.median_ms < 10.0, (remote, here)

        kernels = dm.runtime.kernel_times([dm.runtime.to_device(X.numpy())], runs=3)
        assert kernels and all(k["total_ms"] > 0 for k in kernels)
        assert any("conv2d" in k["name"] for k in kernels)
    finally:
        dm.runtime.close()

    # engine.profile measures each kernel on the device (and gives the lease back on return).
    prof = engine.profile(model, _deployment(rpc_farm), X, runs=3)
    assert prof["latency_ms"] > 0 and prof["kernels"] and prof["kernels"][0]["kind"] == "kernel"
    rpc_farm.wait_servers(2, timeout_s=30)

    # engine.get_latency on the remote deployment goes through the oracle and its store.
    oracle = Oracle(LatencyStore(tmp_path / "lat.sqlite"), QUICK, compile_fn=engine.compile)
    m = oracle.measure(model, _deployment(rpc_farm), X)
    assert m.ok and oracle.lookup(model, _deployment(rpc_farm), X).median_ms == m.median_ms
    rpc_farm.wait_servers(2, timeout_s=30)  # the oracle gave its lease back


def rpc_farm_servers(farm) -> set[str]:
    return {f"{farm.host}:{p}" for p in farm.server_ports}


def test_devices_cli_shows_the_queue(rpc_farm, capsys):
    from omnic.cli.app import main

    assert main(["devices", "--tracker", rpc_farm.address, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    row = next(r for r in data["keys"] if r["key"] == FARM_KEY)
    assert row["servers"] == 2 and row["free"] == 2 and row["pending"] == 0
    assert main(["devices", "--tracker", rpc_farm.address]) == 0
    assert FARM_KEY in capsys.readouterr().out


# ---------------------------------------------------------------------- parallel batches
@pytest.mark.slow
def test_measure_many_in_parallel_over_two_servers(rpc_farm, tmp_path):
    oracle = Oracle(LatencyStore(tmp_path / "lat.sqlite"), QUICK, compile_fn=engine.compile)
    models = [_model(w) for w in (4, 8, 12, 16)] + [_model(8)]  # the last repeats a structure
    seen = []
    results = oracle.measure_many(models, _deployment(rpc_farm), X,
                                  on_result=lambda i, m: seen.append(i))
    assert all(m.ok for m in results), [m.error for m in results]
    assert results[4].median_ms == results[1].median_ms  # measured once
    assert sorted(seen) == list(range(5))
    stats = oracle.last_batch_stats
    assert stats["servers"] == 2 and stats["workers"] == 2 and stats["failed"] == 0
    rows = list(oracle.store.rows())
    assert len(rows) == 4
    import json

    servers = {json.loads(r["extra"])["server"] for r in rows}
    assert servers == rpc_farm_servers(rpc_farm)  # both devices measured
    # A second pass is answered by the store.
    again = oracle.measure_many(models, _deployment(rpc_farm), X)
    assert all(m.cached for m in again) and oracle.fresh_measurements == 4


# ------------------------------------------------------------------------------ faults
@pytest.mark.slow
def test_server_killed_during_batch_the_batch_completes(rpc_farm, tmp_path, monkeypatch):
    from omnic.remote import batch as rpc_batch

    real = rpc_batch.measure_on_server
    calls = []
    killed = []

    def measure_and_kill(session, library, deployment, *args, server="", **kwargs):
        calls.append(server)
        if len(calls) == 2 and not killed:
            # Kill this server while it is timing the candidate (the measurement below takes
            # longer than the delay).
            killed.append(server)
            threading.Timer(0.4, rpc_farm.kill_server_at, args=(server,)).start()
        return real(session, library, deployment, *args, server=server, **kwargs)

    monkeypatch.setattr(rpc_batch, "measure_on_server", measure_and_kill)
    oracle = Oracle(LatencyStore(tmp_path / "lat.sqlite"),
                    MeasureConfig(min_repeat_ms=400, repeats=3, max_rounds=1, time_budget_s=0.1), compile_fn=engine.compile)
    models = [_model(w) for w in (4, 6, 8, 10)]
    results = oracle.measure_many(models, _deployment(rpc_farm), X,
                                  batch=BatchConfig(backoff_s=0.2, max_retries=3, timeout_s=60))
    assert killed, "the fault was never injected"
    assert all(m.ok for m in results), [m.error for m in results]
    assert oracle.last_batch_stats["retries"] >= 1
    rows = list(oracle.store.rows())
    assert len(rows) == 4 and all(r["error"] is None for r in rows), [
        (r["structural_hash"], r["context"], r["error"]) for r in rows]  # nothing finished was lost
    import json

    retried = [json.loads(r["extra"]) for r in rows if json.loads(r["extra"])["errors"]]
    assert retried and killed[0] in retried[0]["errors"][0]
    assert all(json.loads(r["extra"])["server"] != killed[0] or not json.loads(r["extra"])["errors"]
               for r in rows)


@pytest.mark.slow
def test_a_candidate_past_its_timeout_is_marked_failed_and_the_batch_goes_on(rpc_farm, tmp_path, monkeypatch):
    # plain loop nests: the default schedules run Heavy in tens of milliseconds
    monkeypatch.setattr(build, "build_result", functools.partial(build.build_result, default_rules=()))
    oracle = Oracle(LatencyStore(tmp_path / "lat.sqlite"), QUICK, compile_fn=engine.compile)
    heavy = Heavy().eval()
    models = [_model(4), heavy, _model(6)]
    inputs = [X, torch.randn(1, 128, 64, 64), X]
    traced = [engine.trace(m, x) for m, x in zip(models, inputs)]
    t0 = time.monotonic()
    results = oracle.measure_many(traced, _deployment(rpc_farm),
                                  batch=BatchConfig(timeout_s=6.0, max_retries=1, backoff_s=0.2))
    assert results[0].ok and results[2].ok
    assert not results[1].ok and "timeout" in results[1].error and "6 s" in results[1].error
    assert oracle.last_batch_stats["timeouts"] == 1
    rows = {r["structural_hash"]: r for r in oracle.store.rows()}
    assert rows[traced[1].structural_hash]["error"].startswith("timeout")
    assert rows[traced[0].structural_hash]["error"] is None
    assert time.monotonic() - t0 < 90
    # The server ended the session itself and is back in the farm.
    rpc_farm.wait_servers(2, timeout_s=30)


@pytest.mark.parametrize("address", ["127.0.0.1:{free}", "10.255.255.1:9190"])
def test_unreachable_tracker_is_a_clear_error_within_a_bounded_time(address, tmp_path):
    address = address.format(free=free_port())
    deployment = {"device": "host", "tracker": address}
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachableError, match=address.replace(".", r"\.")):
        connect_tracker(address, timeout_s=2.0)
    with pytest.raises(DeviceUnreachableError, match=address.replace(".", r"\.")):
        Oracle(LatencyStore(tmp_path / "lat.sqlite"), compile_fn=engine.compile).measure_many(
            [_model(4)], deployment, X, batch=BatchConfig(connect_timeout_s=2.0))
    with pytest.raises(DeviceUnreachableError, match=address.replace(".", r"\.")):
        rpc_runner.make_rpc_runner(deployment, connect_timeout_s=2.0)
    assert time.monotonic() - t0 < 15.0

    if address.startswith("10."):
        from omnic.cli.app import main

        assert main(["devices", "--tracker", address]) == 2  # the CLI prints the error, no traceback


def test_cli_binds_loopback_by_default_and_warns_about_uploaded_code():
    from omnic.cli.app import build_parser

    parser = build_parser()
    assert parser.parse_args(["tracker"]).host == "127.0.0.1"
    args = parser.parse_args(["serve", "--tracker", "127.0.0.1:9190"])
    assert args.host == "127.0.0.1" and args.key is None and args.device == "host"
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("tracker", "serve"):
        assert "trusted network" in sub.choices[name].format_help().replace("\n", " ")


def test_lease_timeout_names_the_key(rpc_farm):
    with TrackerClient(rpc_farm.address) as client:
        t0 = time.monotonic()
        with pytest.raises(omnic.LeaseTimeoutError, match="no-such-board"):
            client.request("no-such-board", wait_s=1.0)
        assert time.monotonic() - t0 < 5.0


# ----------------------------------------------------------------------------- tuning
@pytest.mark.slow
def test_rpc_runner_tunes_on_the_device(rpc_farm, tmp_path):
    """omnic.compile.tuning.tune on a remote deployment measures its candidates through make_rpc_runner."""
    from tvm.s_tir import meta_schedule as ms

    from omnic.compile import frontend, pipeline
    from omnic.compile import tuning
    from omnic.compile.target import tvm_target
    from omnic.core.deployment import Deployment

    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x)

    deployment = Deployment.coerce(_deployment(rpc_farm, threads=1))
    runner = rpc_runner.make_rpc_runner(deployment)
    assert isinstance(runner, ms.runner.RPCRunner)

    traced = engine.trace(MatMul().eval(), torch.randn(2, 32))
    target = tvm_target(deployment.spec, num_threads=1)
    prepared = pipeline.prepare(frontend.lower(traced), deployment.spec, target, "fp32")
    made = []
    real_make = rpc_runner.make_rpc_runner

    def spy(*args, **kwargs):
        made.append(args[0])
        return real_make(*args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(rpc_runner, "make_rpc_runner", spy):
        db, report = tuning.tune(prepared, deployment, target, trials=4, progress=False,
                                 database_path=tmp_path / "db",
                                 config=tuning.TuningConfig(trials_per_iter=4, cost_model="random",
                                                            number=2, min_repeat_ms=5))
    assert made and made[0].tracker == rpc_farm.address  # the tuner asked for the RPC runner
    assert report["trials"] >= 1, report
    records = db.get_all_tuning_records()
    secs = [float(s) for r in records for s in (r.run_secs or [])]
    # Timed on the device: a failed run is recorded as 1e10 s.
    assert secs and all(0 < s < 1.0 for s in secs), secs


def test_one_address_parser_for_deployments_and_the_tracker_client():
    from omnic.core.address import parse_address
    from omnic.core.deployment import Deployment
    from omnic.core.errors import DeploymentError

    assert parse_address("127.0.0.1:9190") == ("127.0.0.1", 9190)
    assert parse_address(("board", 9090)) == ("board", 9090)
    assert parse_address("::1:9190") == ("::1", 9190)  # the port follows the last colon
    for bad in ("no-port", ":9190", "host:", "host:port"):
        with pytest.raises(DeploymentError, match="HOST:PORT"):
            parse_address(bad)
        with pytest.raises(DeploymentError, match="HOST:PORT"):
            Deployment(device="host", tracker=bad)
        with pytest.raises(DeploymentError, match="HOST:PORT"):
            TrackerClient(bad)  # before any connection is tried
