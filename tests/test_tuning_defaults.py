"""The default schedule is every task's baseline: a record or a transferred trace is used only
where tuning beat the default schedule's time (measured as the trials are)."""
from __future__ import annotations

import json

import pytest
from omnic import Deployment
from omnic.compile import tuning, transfer
from omnic.compile.rules.cpu import PROVENANCE_ATTR, RULES_REVISION
from omnic.compile.tuning import builders, defaults, replay
from omnic.compile.tuning.ledger import LEDGER, LEDGER_VERSION
from omnic.compile.tuning.planner import extract_tasks
from omnic.core.deployment import Deployment as _Deployment
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
                                         builders.make_runner(_Deployment.coerce("host"), config, None))
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
    result = build.build_result(mod, spec, target, database, failures_dir=tmp_path)
    assert {r.outcome for r in result.replay if "conv2d" in r.kernel} == {"default"}
    provenance = dict(build.kernel_schedules(result.module))
    conv = [p for k, p in provenance.items() if "conv2d" in k]
    assert conv and all(p.startswith("default:") for p in conv), provenance
    # without the ledger the same database's records are replayed
    plain = build.build_result(mod, spec, target, database, failures_dir=None)
    assert {r.outcome for r in plain.replay if "conv2d" in r.kernel} == {"tuned"}
