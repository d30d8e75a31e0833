"""The default schedule is every task's baseline: a record or a transferred trace is used only
where tuning beat the default schedule's time (measured as the trials are)."""
from __future__ import annotations

import json

import pytest
import tvm
from omnic import Deployment
from omnic.compile import tuning, transfer
from omnic.compile.rules.cpu import PROVENANCE_ATTR, RULES_REVISION
from omnic.compile.tuning import builders, defaults, replay
from omnic.compile.tuning.ledger import LEDGER, LEDGER_VERSION
from omnic.compile.tuning.planner import extract_tasks
from tests.test_transfer import prepared_net, sketch_database


@pytest.fixture(scope="module")
def source():
    """Net(16) and a database of design-space samples of its tasks (each 'measured' 0.1 ms)."""
    mod, target = prepared_net(16)
    return mod, target, sketch_database(mod, target)


def record_keys(database) -> set[str]:
    return {defaults.anchor_key(r.workload.mod) for r in database.get_all_tuning_records()}


def write_ledger(folder, times: dict[str, float], rules: int = RULES_REVISION):
    folder.mkdir(parents=True, exist_ok=True)
    tasks = {key: {"name": key, "trials": 8, "complete": True, "default_ms": ms_, "rules": rules}
             for key, ms_ in times.items()}
    (folder / LEDGER).write_text(json.dumps({"version": LEDGER_VERSION, "tasks": tasks}))


def test_default_times_are_measured_with_the_tuners_runner(source):
    mod, target, _ = source
    config = tuning.TuningConfig(number=2, min_repeat_ms=5, cold_cache_repeats=0)
    tasks = extract_tasks(mod, target, config)
    builders.light_tensor_intrinsics(target)
    measured = defaults.measure_defaults([(t.key, t.extracted.dispatched[0]) for t in tasks], target,
                                         builders.make_builder(config, "inproc"),
                                         builders.make_runner(Deployment.coerce("host"), config, None))
    convs = [t.key for t in tasks if "conv2d" in t.name]
    assert len(convs) == 3 and all(k in measured for k in convs), (measured, [t.name for t in tasks])
    assert all(0 < v < 10 for v in measured.values())  # milliseconds, not seconds


def test_ledger_baselines_belong_to_the_current_rules(tmp_path):
    write_ledger(tmp_path / "a", {"k1": 0.5, "k2": 0.25})
    assert defaults.baselines(tmp_path / "a") == {"k1": 0.5, "k2": 0.25}
    write_ledger(tmp_path / "b", {"k1": 0.5}, rules=RULES_REVISION - 1)  # timed with older rules
    assert defaults.baselines(tmp_path / "b") == {}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / LEDGER).write_text("{ not json")
    assert defaults.baselines(tmp_path / "c") == {} and defaults.baselines(None) == {}


@pytest.mark.parametrize("default_ms,expected", [(1.0, "tuned"), (0.01, "default")])
def test_a_record_is_replayed_only_where_it_beats_the_default(source, default_ms, expected):
    mod, target, database = source
    times = {key: default_ms for key in record_keys(database)}  # the records say 0.1 ms
    with target:
        out, outcomes = replay.apply_database(mod, target, database, defaults=times)
        _, forced = replay.apply_database(mod, target, database, defaults=times,
                                          records_only=frozenset(o.kernel for o in outcomes))
    convs = [o for o in outcomes if "conv2d" in o.kernel]
    assert len(convs) == 3 and {o.outcome for o in convs} == {expected}
    for o in convs:
        scheduled = out[o.kernel].attrs is not None and PROVENANCE_ATTR in out[o.kernel].attrs
        assert scheduled == (expected == "tuned")
    # a kernel whose default schedule does not build uses its records whatever the times say
    assert {o.outcome for o in forced if "conv2d" in o.kernel} == {"tuned"}


def test_transfer_copies_only_tuning_that_beat_the_default(source):
    _, target, database = source
    wide, _ = prepared_net(24)
    keys = record_keys(database)
    with target:
        _, won = transfer.transfer_schedules(wide, target, database, defaults={k: 1.0 for k in keys})
        _, lost = transfer.transfer_schedules(wide, target, database, defaults={k: 0.01 for k in keys})
    anchored = [o.kernel for o in won if o.outcome != "no-anchor"]
    assert len(anchored) == 5 and all(o.outcome == "transferred" for o in won if o.kernel in anchored)
    assert all(o.outcome == "default" and o.source for o in lost if o.kernel in anchored), lost


def test_a_build_keeps_the_default_where_the_ledger_says_it_is_faster(source, tmp_path):
    """Through ``build_result``, as ``engine.compile`` calls it with the device's database folder."""
    from omnic.compile import build

    mod, target, database = source
    write_ledger(tmp_path, {k: 0.01 for k in record_keys(database)})
    spec = Deployment.coerce("host").spec
    # "transferred": the build times nothing, so the ledger's times judge the records (as on a
    # remote device)
    result = build.build_result(mod, spec, target, database, failures_dir=tmp_path, transfer="transferred")
    assert {r.outcome for r in result.replay if "conv2d" in r.kernel} == {"default"}
    provenance = dict(build.kernel_schedules(result.module))
    conv = [p for k, p in provenance.items() if "conv2d" in k]
    assert conv and all(p.startswith("default:") for p in conv), provenance
    # without the ledger, or unjudged, the same database's records are replayed
    plain = build.build_result(mod, spec, target, database, failures_dir=None, transfer="transferred")
    assert {r.outcome for r in plain.replay if "conv2d" in r.kernel} == {"tuned"}
    unjudged = build.build_result(mod, spec, target, database, failures_dir=tmp_path, judge_records=False)
    assert {r.outcome for r in unjudged.replay if "conv2d" in r.kernel} == {"tuned"}


def test_a_local_build_times_each_record_against_its_default(source, tmp_path):
    """The measure choice (the default on this CPU): each replayed record is timed side by side
    with the kernel's default schedule and kept only if faster; the decisions are remembered."""
    from omnic.compile import build
    from omnic.compile.transfer import choice

    mod, target, database = source
    spec = Deployment.coerce("host").spec
    result = build.build_result(mod, spec, target, database, failures_dir=tmp_path)
    judged = {r.kernel: r.outcome for r in result.replay}
    assert judged and set(judged.values()) <= {"tuned", "default"}
    decisions = json.loads((tmp_path / choice.DECISIONS).read_text())["decisions"]
    assert len(decisions) >= len(judged)
    provenance = dict(build.kernel_schedules(result.module))
    for kernel, outcome in judged.items():
        kind = next(p for k, p in provenance.items() if k.removesuffix("_prepacked") == kernel).split(":")[0]
        assert kind == outcome, (kernel, outcome, kind)
    again = build.build_result(mod, spec, target, database, failures_dir=tmp_path)
    assert build.kernel_schedules(again.module) == build.kernel_schedules(result.module)


def test_measured_choices_are_remembered_next_to_the_database(source, tmp_path):
    from omnic.compile.transfer import choice

    mod, _, _ = source
    kernels = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)][:3]
    asked = []

    def decide(gv, original, transferred):
        asked.append(gv.name_hint)
        return len(asked) % 2 == 1

    first = choice._Remembered(decide, tmp_path)
    answers = [first(gv, f, f.with_attr("x", 1)) for gv, f in kernels]
    assert asked == [gv.name_hint for gv, _ in kernels] and answers == [True, False, True]
    # a later build (another object, as another process) asks nothing and answers the same
    again = choice._Remembered(decide, tmp_path)
    assert [again(gv, f, f.with_attr("x", 1)) for gv, f in kernels] == answers and len(asked) == 3
    # another transferred schedule of the same kernel is a new question
    again(kernels[0][0], kernels[0][1], kernels[0][1].with_attr("x", 2))
    assert len(asked) == 4
    # a broken file costs the timings, never the build
    (tmp_path / choice.DECISIONS).write_text("{ broken")
    assert choice._Remembered(decide, tmp_path)(*kernels[0], kernels[0][1].with_attr("x", 1)) in (True, False)
    assert len(asked) == 5
