"""Tuned omnic vs ONNX Runtime vs PyTorch eager, batch 1, same threads, in one process.

For each zoo model: tune into a fresh (or given) database for a time budget, compile with it,
then measure the three frameworks in interleaved rounds (sleeping between frameworks so one
does not run in the other's thermal/scheduler wake): per-call wall time from Python with
torch/numpy in and outputs out, plus TVM's native timer (``DeviceModel.measure``).

usage:
    TVM_NUM_THREADS=2 python benchmarks/bench_tuned.py --models mobilenet_v2 --budget-s 300
    python benchmarks/bench_tuned.py --models mobilenet_v2 resnet18 --budget-s 900 --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # TVM reads the thread count once, at start-up
    _threads = "2"
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _threads = sys.argv[_i + 1]
    os.environ.setdefault("TVM_NUM_THREADS", _threads)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_line, side_by_side  # noqa: E402


def bench_model(name: str, budget_s: float, threads: int, rounds: int, config, min_time_s: float) -> dict:
    from omnic import Deployment, engine
    from omnic.compile import tuning
    from omnic.examples import zoo

    model, x = zoo.get_model(name)
    deployment = Deployment(device="host", threads=threads, tuning_trials=0, tuning_time_s=budget_s)
    t0 = time.perf_counter()
    with tuning.using(config):
        dm = engine.compile(model, deployment, x, progress=True)
    compile_s = time.perf_counter() - t0
    rep = dm.report["tuning"]
    print(f"[{name}] compile {compile_s:.0f}s, tuning {rep.get('wall_s')}s, tasks {rep['tasks']} "
          f"(in db {rep.get('tasks_in_database')}, tuned {rep.get('tasks_tuned')}), trials {rep['trials']}, "
          f"stopped_by_time {rep.get('stopped_by_time')}, kernels scheduled {dm.report['kernels_scheduled']}/"
          f"{dm.report['kernels_scheduled'] + dm.report['kernels_unscheduled']}, "
          f"max_rel_error {dm.report['max_rel_error']:.2e}", flush=True)

    res = side_by_side(model, x, dm, threads=threads, rounds=rounds, min_time_s=min_time_s, label=name)
    return {
        "model": name, "budget_s": budget_s, "threads": threads, "compile_s": round(compile_s, 1),
        "tuning": {k: rep.get(k) for k in ("tasks", "tasks_in_database", "tasks_tuned", "trials", "wall_s",
                                          "stopped_by_time", "estimated_model_ms", "database")},
        "max_rel_error": dm.report["max_rel_error"], **res,
    }


def table(results: list[dict]) -> str:
    lines = ["| model | budget | tasks tuned / total | trials | omnic per call | omnic TVM timer | ONNX Runtime | "
             "torch eager | omnic/ORT | omnic/torch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, t = r["median_ms"], r["tuning"]
        lines.append(f"| {r['model']} | {r['budget_s'] / 60:.0f} min | {t['tasks_tuned']}/{t['tasks']} | {t['trials']} "
                     f"| {m['omnic']:.3f} ms | {m['omnic_native']:.3f} ms | {m['ort']:.3f} ms | {m['torch']:.3f} ms "
                     f"| {r['ratio_omnic_ort']:.2f} | {r['ratio_omnic_torch']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--budget-s", type=float, default=300.0, help="tuning time budget per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time-s", type=float, default=1.0, help="timed calls per framework per round")
    ap.add_argument("--builder", default="auto", choices=("auto", "inproc", "pool", "local"))
    ap.add_argument("--per-iter", type=int, default=16, help="trials per batch")
    ap.add_argument("--population", type=int, default=256, help="evolutionary search population")
    ap.add_argument("--genetic-iters", type=int, default=2, help="evolutionary search genetic iterations")
    ap.add_argument("--cache-dir", default=None,
                    help="cache root (default: a fresh folder, so the budget starts from an empty database)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    os.environ["OMNIC_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="omnic-bench-tuned-")
    print(f"machine: {machine_line()}; TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}; "
          f"cache {os.environ['OMNIC_CACHE_DIR']}", flush=True)
    from omnic.compile import tuning

    config = tuning.TuningConfig(builder=args.builder, trials_per_iter=args.per_iter,
                                 population_size=args.population, genetic_num_iters=args.genetic_iters)
    print(f"tuning config: {config}", flush=True)
    results = [bench_model(m, args.budget_s, args.threads, args.rounds, config, args.min_time_s)
               for m in args.models]
    print(table(results))
    print(f"machine after: {machine_line()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
