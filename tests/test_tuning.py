"""MetaSchedule tuning inside compile: persistent shared database, resume, budgets.

Budgets are tiny (a few trials per task, a small population, no XGBoost retraining) so that the
file runs in a few minutes on 2 shared cores; what is tested is the machinery, not the search.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import omnic
import torch
import torch.nn as nn

from omnic import Deployment, engine
from omnic.compile import build, profiler
from omnic.compile import tuning
from omnic.compile.build import scheduled_kernels
from omnic.compile.target import tvm_target
from omnic.core.measure import MeasureConfig

FAST = tuning.TuningConfig(trials_per_iter=4, population_size=24, genetic_num_iters=1, number=2,
                           min_repeat_ms=5, cost_model="random")


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3))


class NetA(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.body, self.fc = Body(), nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def make(classes=10, seed=0):
    torch.manual_seed(seed)
    m = NetA(classes)
    m.train()
    with torch.no_grad():  # non-trivial BN statistics, so BN folding is exercised
        m(torch.randn(4, 3, 32, 32))
    return m.eval()


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuning-cache")
    old = os.environ.get("OMNIC_CACHE_DIR")
    os.environ["OMNIC_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("OMNIC_CACHE_DIR", None)
    else:
        os.environ["OMNIC_CACHE_DIR"] = old


def compile_(model, trials, **kw):
    with tuning.using(FAST):
        return engine.compile(model, Deployment(device="host", tuning_trials=trials, **kw), X, progress=False)


def test_tuning_beats_untuned_and_database_is_shared(cache, monkeypatch):
    # the baseline is the plain loop nests: without the default CPU schedules (which a 20-trial
    # budget is not meant to beat)
    with monkeypatch.context() as patch:
        patch.setattr(build, "build_result", functools.partial(build.build_result, default_rules=()))
        untuned = compile_(make(), 0)
    assert untuned.report["tuning"]["trials"] == 0 and untuned.report["kernels_scheduled"] == 0

    tuned = compile_(make(), 20)  # 5 tasks (2 convs, mean, matmul, transpose): a batch each
    rep = tuned.report["tuning"]
    assert rep["tasks"] == 5 and rep["new_tasks"] == 5 and rep["tasks_in_database"] == 0
    assert rep["tasks_tuned"] == 5 and 0 < rep["trials"] <= 20 and rep["wall_s"] > 0
    # heaviest first: the report lists tasks in tuning order
    heaviness = [t["flops"] * t["weight"] for t in rep["per_task"]]
    assert heaviness == sorted(heaviness, reverse=True)
    assert rep["per_task"][0]["name"].startswith("fused_conv2d")
    assert tuned.report["kernels_scheduled"] >= 4
    assert tuned.report["max_rel_error"] <= 1e-4
    # the re-laid-out weights, folded at compile time, reach the kernels as plain constants: the
    # VM builds and unpacks no tuple per call for them
    runtime = tuned.runtime
    called = {s["name"] for s in profiler.call_sites(runtime.vm, [runtime.to_device(a) for a in tuned.random_inputs()],
                                                     runs=2, sessions=1)}
    assert any(name.endswith("_prepacked") for name in called), called
    assert not called & {"vm.builtin.make_tuple", "vm.builtin.tuple_getitem"}, called

    config = MeasureConfig(min_repeat_ms=20, repeats=5, max_rounds=2, time_budget_s=0.1)
    t_untuned = untuned.measure(config).median_ms
    t_tuned = tuned.measure(config).median_ms
    assert t_tuned < t_untuned, (t_tuned, t_untuned)

    # the same model again (new weights too): everything is in the database, nothing is tuned
    again = compile_(make(seed=3), 20)
    rep2 = again.report["tuning"]
    assert rep2["trials"] == 0 and rep2["new_tasks"] == 0 and rep2["tasks_in_database"] == 5
    assert again.report["kernels_scheduled"] == tuned.report["kernels_scheduled"]
    assert again.report["max_rel_error"] <= 1e-4

    # a model sharing its body: only the new head (matmul 32->5) is tuned
    other = compile_(make(classes=5), 20)
    rep3 = other.report["tuning"]
    assert rep3["tasks"] == 5 and rep3["tasks_in_database"] == 4 and rep3["new_tasks"] == 1
    assert rep3["tasks_tuned"] == 1 and 0 < rep3["trials"] <= 20
    assert [t["name"] for t in rep3["per_task"] if t["trials_run"]][0].startswith("fused_matmul")
    assert other.report["max_rel_error"] <= 1e-4


def test_time_budget_tunes_heaviest_first_then_stops(fresh_cache):
    m = make()
    with tuning.using(FAST):
        dm = engine.compile(m, Deployment(device="host", tuning_trials=40, tuning_time_s=0.01), X,
                            progress=False)
    rep = dm.report["tuning"]
    assert rep["stopped_by_time"] is True
    tuned = [t for t in rep["per_task"] if t["trials_run"] > 0]
    assert len(tuned) == 1 and tuned[0] is rep["per_task"][0]  # the heaviest task, one batch
    assert dm.report["max_rel_error"] <= 1e-4
    ledger = json.loads((Path(rep["database"]) / tuning.LEDGER).read_text())
    assert [e["complete"] for e in ledger["tasks"].values() if e["trials"]] == [False]
    # every planned task's default schedule was timed before the first trial (a task with no
    # trials yet stays new: its ledger entry holds only that time)
    assert all(e.get("default_ms") for e in ledger["tasks"].values() if "conv2d" in e["name"])


_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["OMNIC_CACHE_DIR"] = sys.argv[1]
    sys.path.insert(0, sys.argv[2])
    from tests.test_tuning import FAST, X, make
    from omnic import Deployment, engine
    from omnic.compile import build, profiler
    from omnic.compile import tuning
    with tuning.using(FAST):
        engine.compile(make(), Deployment(device="host", tuning_trials=int(sys.argv[3])), X, progress=False)
    print("FINISHED")
""")


def _records(path: Path) -> int:
    f = path / "database_tuning_record.json"
    return len([line for line in f.read_text().splitlines() if line.strip()]) if f.exists() else 0


def test_killed_tune_keeps_trials_and_resumes(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    repo = str(Path(__file__).resolve().parents[1])
    budget = 40  # 8 per task: two batches of 4 each
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(cache_dir), repo, str(budget)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    ledger_file = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and child.poll() is None:
            found = list(cache_dir.glob(f"tuning/*/{tuning.LEDGER}"))
            if found:
                ledger_file = found[0]
                tasks = json.loads(ledger_file.read_text())["tasks"]
                # kill in the middle of the first task (after its first batch, before its second)
                if any(e.get("trials", 0) >= 4 for e in tasks.values()):
                    break
            time.sleep(0.05)
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert ledger_file is not None
    db_dir = ledger_file.parent
    kept = _records(db_dir)
    assert kept >= 4  # every finished batch survived the kill
    ledger = json.loads(ledger_file.read_text())["tasks"]
    done_before = sum(e["trials"] for e in ledger.values())
    assert not all(e.get("complete") for e in ledger.values())

    # a torn last line (kill during an append) must not break the reload
    with open(db_dir / "database_tuning_record.json", "a") as fh:
        fh.write('[0, [[[1, 2')
    monkeypatch.setenv("OMNIC_CACHE_DIR", str(cache_dir))
    resumed = compile_(make(), budget)
    rep = resumed.report["tuning"]
    assert rep["resumed_tasks"] >= 1
    # only the missing trials are run: at most the budget minus what the killed run finished
    assert 0 < rep["trials"] <= budget - done_before
    assert rep["tasks_completed"] == rep["tasks"] - rep["tasks_in_database"]
    assert _records(db_dir) >= kept + rep["trials"] - 1
    assert resumed.report["max_rel_error"] <= 1e-4
    final = compile_(make(), budget).report["tuning"]
    assert final["trials"] == 0 and final["new_tasks"] == 0


def test_torn_database_line_is_repaired(tmp_path):
    f = tmp_path / "db.json"
    f.write_text('[0, {"a": 1}]\n[1, {"b": 2}]\n[2, {"c"')
    assert tuning.repair_jsonl(f) == 1
    assert f.read_text() == '[0, {"a": 1}]\n[1, {"b": 2}]\n'
    f.write_text('[0, 1]')  # complete record, newline missing: kept
    assert tuning.repair_jsonl(f) == 0 and f.read_text() == "[0, 1]\n"


def test_config_and_budget_errors_are_typed():
    with pytest.raises(omnic.TuningError):
        tuning.TuningConfig(builder="threads")
    with pytest.raises(omnic.TuningError):
        tuning.TuningConfig(cost_model="mlp")
    assert issubclass(omnic.TuningError, __import__("omnic").OmnicError)


def test_database_is_per_device_target_and_precision(fresh_cache):
    host = Deployment(device="host")
    target = tvm_target(host.spec, num_threads=2)
    a = tuning.database_dir(host, target)
    b = tuning.database_dir(Deployment(device="host", precision="fp16"), target)
    c = tuning.database_dir(host, tvm_target(host.spec, num_threads=1))
    assert len({a, b, c}) == 3 and a.parent == fresh_cache / "tuning"


def test_gpu_device_compiles_with_tuning_requested(fresh_cache):
    # no GPU here: tuning is skipped with a reason, and the build itself must not break
    dm = engine.compile(make(), Deployment(device="a100", tuning_trials=8), X, check=False, progress=False)
    assert "skipped" in dm.report["tuning"] and dm.report["tuning"]["trials"] == 0


def test_remote_deployment_uses_the_rpc_runner(monkeypatch, fresh_cache):
    import omnic.remote.runner

    calls = []

    class Stop(Exception):
        pass

    def fake(deployment, evaluator_config):
        calls.append((deployment.device, evaluator_config))
        raise Stop

    monkeypatch.setattr(omnic.remote.runner, "make_rpc_runner", fake)
    d = Deployment(device="host", tracker="127.0.0.1:9", tuning_trials=4)
    with tuning.using(FAST), pytest.raises(Stop):
        engine.compile(make(), d, X, check=False, progress=False)
    assert calls and calls[0][0] == "host"
    evaluator = calls[0][1]  # the config's cold-cache protocol: single flushed runs
    assert int(evaluator.number) == 1 and int(evaluator.repeat) == FAST.cold_cache_repeats > 0
    assert bool(evaluator.enable_cpu_cache_flush)


def test_cli_tune_needs_a_budget(capsys):
    from omnic.cli.app import main

    assert main(["tune", "resnet_small"]) == 2
    assert "--trials" in capsys.readouterr().err


def test_batches_go_to_the_costliest_task_after_one_each():
    """After one batch per task (heaviest first), batches follow each task's share of model time."""
    from omnic.compile.tuning.planner import Task, next_task

    conv = Task(name="conv", key="a", weight=2, flops=10.0, extracted=None)  # 2 x 1.0 ms
    pool = Task(name="pool", key="b", weight=1, flops=1.0, extracted=None)  # 0.2 ms
    broken = Task(name="broken", key="c", weight=1, flops=0.5, extracted=None)  # every build fails
    latency = {"conv": 1.0, "pool": 0.2, "broken": None}
    order = []
    for _ in range(14):
        task = next_task([conv, pool, broken])
        order.append(task.name)
        task.batches += 1
        task.best_ms = latency[task.name]
    assert order[:3] == ["conv", "pool", "broken"]  # coverage first, in the planned order
    assert broken.batches == 1  # no measured latency: no claim beyond its first batch
    assert conv.batches >= 5 * pool.batches  # 2 ms of model time vs 0.2 ms


def test_a_task_that_stops_improving_yields_to_one_that_still_improves():
    """The claim blends 1 / batches with the measured improvement of the last two batches: the
    conv still gaining 15 % a batch gets more batches than the converged one, even once it costs
    the model less (1 / batches alone would give the converged one 9 of 16), and the converged
    one still gets some (the forward term keeps it in the race)."""
    from omnic.compile.tuning.planner import Task, next_task

    flat = Task(name="flat", key="a", weight=1, flops=2.0, extracted=None)
    steep = Task(name="steep", key="b", weight=1, flops=1.0, extracted=None)
    latency = {"flat": lambda b: 1.0, "steep": lambda b: max(0.5, 2.0 * 0.85 ** b)}
    order = []
    for _ in range(16):
        task = next_task([flat, steep], per_iter=8)
        order.append(task.name)
        task.batches += 1
        task.best_ms = latency[task.name](task.batches)
        task.history.append(task.best_ms)
    assert order[:2] == ["flat", "steep"]  # coverage first, heaviest first
    assert steep.batches > flat.batches >= 4, order
    # a resumed task counts the batches of earlier runs: its forward claim is already small
    resumed = Task(name="resumed", key="c", weight=1, flops=1.0, extracted=None, trials_before=80, best_ms=1.0)
    fresh = Task(name="fresh", key="d", weight=1, flops=1.0, extracted=None, best_ms=1.0, batches=1)
    assert resumed.claim(8) < fresh.claim(8)
    assert Task(name="broken", key="e", weight=3, flops=1.0, extracted=None, batches=1).claim(8) == 0.0


def test_epilogue_variants_of_one_conv_are_one_task(fresh_cache):
    """conv+bias, conv+bias+relu and conv+bias+add share the anchor conv: one task of weight 3,
    tuned once, and its schedule serves all three kernels (outputs still match PyTorch)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            # 8 channels: direct convs (Winograd kernels are one task per epilogue, see test_winograd)
            self.a, self.b, self.c = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

        def forward(self, x):
            y = torch.relu(self.a(x))
            z = self.b(y) + x
            return self.c(z)

    torch.manual_seed(0)
    model, x = Tied().eval(), torch.randn(1, 8, 16, 16)
    with tuning.using(FAST):
        dm = engine.compile(model, Deployment(device="host", tuning_trials=8), x, progress=False)
    rep = dm.report["tuning"]
    convs = [t for t in rep["per_task"] if t["name"].startswith("fused_conv2d")]
    assert len(convs) == 1 and convs[0]["weight"] == 3 and convs[0]["trials_run"] > 0, rep["per_task"]
    sched, _ = scheduled_kernels(dm.module)
    assert sum(name.startswith("fused_conv2d") for name in sched) == 3, sched
    assert dm.report["max_rel_error"] <= 1e-4
