"""Every headline figure of omnic in one run, on ``host``.

Sections (each in its own process, so its peak memory is its own and TVM's thread pool starts
with the right thread count):

* ``tuned-<model>``: tune the zoo model into an empty database for the longest budget, copying
  the database at each shorter mark (default 5, 15 and 30 minutes); then compile with each copy
  and measure omnic (per call from Python and TVM's timer), ONNX Runtime and PyTorch eager in
  interleaved rounds, same threads, batch 1; run-to-run spread of each; the top kernels of the
  final build. The copy at 5 minutes is what the first 5 minutes of the run produced (the
  allocation of trials is the same as a 5-minute run's: one batch per task, heaviest first,
  then by cost). Where a shorter budget builds other kernels (Winograd convs need
  ``winograd.MIN_TUNING_S``), those marks get a tuning run of their own, so each row is what a
  user with that budget gets.
* ``compile-memory-<model>``: a compile with the tuned database, alone: wall time and peak RSS.
* ``oracle``: distinct candidates measured per minute through the oracle with an empty latency
  store: untuned, and tuned with a warm database (the tuning of those workloads already done),
  and the lookup rate once stored.
* ``predictor``: the kernel-level predictor fitted on stored zoo variants (collected on first use
  and kept under the cache), accuracy on held-out variants.
* ``search``: AutoNAS vs random search at the same number of exact measurements on the digits
  supernet: best accuracy under the budget, wall time, peak memory.

A section's result is written to ``<out>/<section>.json`` as soon as it ends, and a rerun skips
the sections that are there (delete a file to redo it): a long run that dies loses only the
section it was in. The table goes to stdout and ``<out>/headline.md``.

usage:
    .venv/bin/python benchmarks/bench_headline.py --out benchmarks/results/headline
    .venv/bin/python benchmarks/bench_headline.py --quick --out /tmp/headline   # minutes, smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0


def conv_table(model_name: str, versus: dict | None, top: int = 8) -> list[str]:
    """Markdown: the convs where omnic loses most time to ONNX Runtime, and the totals."""
    if not versus or not versus.get("pairs"):
        return []
    lines = [f"\n{model_name}, conv by conv against ONNX Runtime (each call's fastest of 30 runs in 3 sessions; "
             f"convs {versus['omnic_conv_ms']:.3f} vs {versus['ort_conv_ms']:.3f} ms, everything else "
             f"{versus['omnic_rest_ms']:.3f} vs {versus['ort_rest_ms']:.3f} ms"
             + (f"; ORT convs without an omnic match: {len(versus['unpaired_ort'])}" if versus["unpaired_ort"] else "")
             + "):", "", "| ORT node | omnic kernel | weights | omnic ms | ORT ms | omnic - ORT |", "|---|---|---:|---:|---:|---:|"]
    for p in sorted(versus["pairs"], key=lambda p: p["ort_ms"] - p["omnic_ms"])[:top]:
        lines.append(f"| {p['ort']} | {p['omnic']} | {p['weight_elements']} | {p['omnic_ms']:.3f} | {p['ort_ms']:.3f} "
                     f"| {p['omnic_ms'] - p['ort_ms']:+.3f} |")
    return lines


# ------------------------------------------------------------------------------------- sections
def _budget_groups(model, x, marks: list[float], threads: int) -> list[list[float]]:
    """The marks in groups that build the same kind of kernels, each group one tuning run.

    A copy of a longer run's database is what a shorter budget gets only when both budgets build
    the same kernels. Winograd convs are built only for long budgets (``winograd.wanted``), so
    for a model that has eligible convs the short marks get a tuning run of their own.
    """
    import tempfile

    from omnic import Deployment, engine
    from omnic.compile import frontend, pipeline
    from omnic.compile import winograd
    from omnic.compile.target import tvm_target

    traced, deployment = engine._coerce(model, Deployment(device="host", threads=threads), x)
    spec = deployment.spec
    prepared = pipeline.prepare(frontend.lower(traced), spec, tvm_target(spec, num_threads=threads), "fp32",
                                winograd=True)
    if not winograd.count_convs(prepared):
        return [marks]
    groups: dict[bool, list[float]] = {}
    with tempfile.TemporaryDirectory() as empty:
        for minutes in marks:
            budget = Deployment(device="host", threads=threads, tuning_time_s=60.0 * minutes)
            groups.setdefault(winograd.wanted(budget, empty), []).append(minutes)
    return sorted(groups.values())


def _tune_with_copies(model, x, marks: list[float], cache: Path, args: argparse.Namespace,
                      config) -> tuple[dict[float, dict], dict, float]:
    """Tune into an empty database for ``marks[-1]`` minutes, copying it at each shorter mark."""
    from omnic import Deployment, engine
    from omnic.compile import tuning

    run_root = cache / f"run-{marks[-1]:g}min"
    shutil.rmtree(run_root, ignore_errors=True)  # the budget starts from an empty database
    os.environ["OMNIC_CACHE_DIR"] = str(run_root)
    deployment = Deployment(device="host", threads=args.threads, tuning_trials=0, tuning_time_s=60.0 * marks[-1])

    # copy the (append-only) database at each mark; a torn last line is repaired on open
    t0 = time.monotonic()
    done = threading.Event()
    copied: dict[float, dict] = {}

    def snapshot(minutes: float) -> None:
        dest = cache / f"at-{minutes:g}min"
        shutil.rmtree(dest, ignore_errors=True)
        if (run_root / "tuning").exists():
            shutil.copytree(run_root / "tuning", dest / "tuning")
        copied[minutes] = {"root": str(dest), "at_s": round(time.monotonic() - t0, 1), "run_minutes": marks[-1]}

    def watcher() -> None:
        for minutes in marks[:-1]:
            while not done.wait(1.0) and time.monotonic() - t0 < 60.0 * minutes:
                pass
            if done.is_set():
                return
            snapshot(minutes)

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    with tuning.using(config):
        dm = engine.compile(model, deployment, x, progress=args.progress)
    done.set()
    thread.join()
    tuning_wall = time.monotonic() - t0
    rep = dm.report["tuning"]
    snapshot(marks[-1])
    for minutes in marks[:-1]:  # tuning ended before a mark: the database at the end is that mark's
        if minutes not in copied:
            copied[minutes] = copied[marks[-1]]
    return copied, rep, tuning_wall


def section_tuned(args: argparse.Namespace, model_name: str, out: Path) -> dict:
    from benchmarks.common import conv_by_conv, ort_node_times, side_by_side, weight_sizes_in_call_order
    from omnic import Deployment, engine
    from omnic.compile import profiler
    from omnic.compile import tuning
    from omnic.examples import zoo

    marks = sorted(args.tune_minutes)
    cache = out / f"cache-tuned-{model_name}"
    shutil.rmtree(cache, ignore_errors=True)
    model, x = zoo.get_model(model_name)
    search = {k: v for k, v in (("trials_per_iter", args.per_iter), ("population_size", args.population),
                                ("genetic_num_iters", args.genetic_iters)) if v is not None}
    config = tuning.TuningConfig(builder=args.builder, cold_cache_repeats=args.cold_cache_repeats, **search)

    copied: dict[float, dict] = {}
    runs = []
    for group in _budget_groups(model, x, marks, args.threads):
        group_copies, rep, tuning_wall = _tune_with_copies(model, x, group, cache, args, config)
        copied.update(group_copies)
        runs.append({"minutes": group[-1], "copies_at": group[:-1], "trials": rep["trials"], "tasks": rep["tasks"],
                     "tasks_tuned": rep.get("tasks_tuned"), "tuning_wall_s": round(tuning_wall, 1),
                     "stopped_by_time": rep.get("stopped_by_time")})
        print(f"[{model_name}] {group[-1]:g}-minute run: {rep['trials']} trials over {rep['tasks']} tasks in "
              f"{tuning_wall:.0f} s (stopped by time: {rep['stopped_by_time']})", flush=True)

    rows = []
    last_dm = None
    for minutes in marks:
        os.environ["OMNIC_CACHE_DIR"] = copied[minutes]["root"]
        t = time.perf_counter()
        mdm = engine.compile(model, Deployment(device="host", threads=args.threads), x, progress=False)
        compile_s = time.perf_counter() - t
        res = side_by_side(model, x, mdm, threads=args.threads, rounds=args.rounds, min_time_s=args.min_time_s,
                           label=f"{model_name} {minutes:g} min")
        run = next(r for r in runs if r["minutes"] == copied[minutes]["run_minutes"])
        rows.append({"minutes": minutes, "snapshot_at_s": copied[minutes]["at_s"], "compile_s": round(compile_s, 1),
                     "run_minutes": run["minutes"], "run_trials": run["trials"],
                     "winograd_convs": mdm.report.get("winograd_convs"),
                     "max_rel_error": mdm.report["max_rel_error"],
                     "kernels_scheduled": mdm.report["kernels_scheduled"],
                     "kernels_unscheduled": mdm.report["kernels_unscheduled"], **res})
        last_dm = mdm
    # where the time goes in the final build: each call's fastest over runs in separate sessions
    # (a slow phase of the VM must not decide the ranking), and conv by conv against ORT's own
    # profile of the same model
    runtime = last_dm.runtime
    inputs = [runtime.to_device(a) for a in last_dm.random_inputs()]
    sites = profiler.call_sites(runtime.vm, inputs, runs=30, sessions=3)
    kernels = profiler.kernels_from_sites(sites)
    versus = conv_by_conv(sites, ort_node_times(model, x, args.threads, runs=30, sessions=3),
                          weight_sizes_in_call_order(last_dm.module))
    per_task = sorted(rep.get("per_task", []), key=lambda t: -(t["best_ms"] or 0) * t["weight"])
    return {"model": model_name, "threads": args.threads, "tuning_wall_s": round(tuning_wall, 1), "runs": runs,
            "trials": rep["trials"], "tasks": rep["tasks"], "tasks_tuned": rep.get("tasks_tuned"),
            "stopped_by_time": rep.get("stopped_by_time"), "estimated_model_ms": rep.get("estimated_model_ms"),
            "rows": rows, "top_kernels": kernels[:10], "conv_by_conv": versus,
            "top_tasks": [{k: t[k] for k in ("name", "weight", "trials_run", "batches", "best_ms") if k in t}
                          for t in per_task[:10]],
            "database": str(cache / f"at-{marks[-1]:g}min")}


def section_compile_memory(args: argparse.Namespace, model_name: str, out: Path) -> dict:
    from omnic import Deployment, engine
    from omnic.examples import zoo

    tuned = json.loads((out / f"tuned-{model_name}.json").read_text())
    os.environ["OMNIC_CACHE_DIR"] = tuned["database"]
    model, x = zoo.get_model(model_name)
    before = _rss_mb()
    t = time.perf_counter()
    dm = engine.compile(model, Deployment(device="host", threads=args.threads), x, progress=False)
    wall = time.perf_counter() - t
    return {"model": model_name, "compile_s": round(wall, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "kernels_scheduled": dm.report["kernels_scheduled"],
            "max_rel_error": dm.report["max_rel_error"]}


def _oracle_candidates(n: int):
    import torch

    from benchmarks.bench_rpc import candidates  # the RPC benchmark's distinct small conv nets

    torch.manual_seed(0)
    return candidates(n)


def section_oracle(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from omnic import Deployment, engine
    from omnic.compile import tuning
    from omnic.oracle import LatencyStore, Oracle

    cache = out / "cache-oracle"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["OMNIC_CACHE_DIR"] = str(cache)
    models = _oracle_candidates(args.oracle_candidates)
    x = torch.randn(1, 3, 64, 64)
    result: dict = {"candidates": len(models), "input": list(x.shape), "trials_per_candidate": args.oracle_trials}

    def rate(deployment: Deployment, store_name: str) -> tuple[float, list]:
        oracle = Oracle(LatencyStore(cache / store_name), compile_fn=engine.compile)
        t = time.perf_counter()
        ms = [oracle.measure(m, deployment, x) for m in models]
        wall = time.perf_counter() - t
        assert all(m.ok for m in ms), [m.error for m in ms if not m.ok]
        return wall, ms

    untuned = Deployment(device="host", threads=args.threads)
    wall, ms = rate(untuned, "untuned.sqlite")
    result["untuned_per_min"] = 60.0 * len(models) / wall
    result["untuned_spread_median"] = statistics.median(m.spread for m in ms)
    tuned = Deployment(device="host", threads=args.threads, tuning_trials=args.oracle_trials)
    # 8 trials a batch: a candidate's few tasks all get tuned (so none is left for the warm pass)
    with tuning.using(tuning.TuningConfig(trials_per_iter=8, population_size=64, genetic_num_iters=1)):
        wall, _ = rate(tuned, "cold.sqlite")  # tunes every new workload into the database
        result["cold_tuning_per_min"] = 60.0 * len(models) / wall
        wall, ms = rate(tuned, "warm.sqlite")  # empty store, warm database: compile + measure only
        result["warm_pass_trials"] = engine.compile(models[-1], tuned, x, progress=False).report["tuning"]["trials"]
    result["warm_db_per_min"] = 60.0 * len(models) / wall
    result["warm_db_spread_median"] = statistics.median(m.spread for m in ms)
    # asking again: trace + structural hash + one SQLite read per candidate; three passes through
    # the candidates, each through a freshly opened store, so a single GC pause or slow phase of
    # the VM (tens of ms) does not become the figure
    lookup_ms = []
    for _ in range(3):
        oracle = Oracle(LatencyStore(cache / "warm.sqlite"), compile_fn=engine.compile)
        for m, first in zip(models, ms):
            t = time.perf_counter()
            again = oracle.measure(m, tuned, x)
            lookup_ms.append(1e3 * (time.perf_counter() - t))
            assert again.median_ms == first.median_ms and oracle.fresh_measurements == 0
    result["stored_lookup_ms"] = {"median": statistics.median(lookup_ms), "mean": statistics.fmean(lookup_ms),
                                  "max": max(lookup_ms), "n": len(lookup_ms)}
    result["stored_lookups_per_s"] = 1e3 / statistics.median(lookup_ms)
    result["stored_equal"] = True  # asserted above for every lookup
    # run-to-run spread of the same candidate: re-measure one with fresh stores
    same = []
    for i in range(args.oracle_repeat):
        o = Oracle(LatencyStore(cache / f"repeat{i}.sqlite"), compile_fn=engine.compile)
        same.append(o.measure(models[0], tuned, x).median_ms)
    result["same_model_medians_ms"] = same
    result["same_model_spread"] = (max(same) - min(same)) / statistics.median(same)
    return result


def section_predictor(args: argparse.Namespace, out: Path) -> dict:
    from omnic.oracle import predictor as P

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sessions = 2  # measurement sessions per network, minutes apart; each figure keeps its fastest
    fit = P.collect(P.fit_variants(args.predictor_fit), "host", log=log, sessions=sessions)
    held = P.collect(P.eval_variants(args.predictor_eval, args.predictor_fit), "host", log=log, sessions=sessions)
    t = time.perf_counter()
    pred = P.KernelLatencyPredictor("host").fit(fit)
    fit_s = time.perf_counter() - t
    ev = pred.evaluate(held)
    nets = [s["kernels"] for s in held]
    t, reps = time.perf_counter(), 0
    while time.perf_counter() - t < 1.0:
        pred.forget_kernels()
        pred.predict_many(nets)
        reps += 1
    floor = P.accuracy([s["e2e_early_ms"] for s in held], [s["e2e_again_ms"] for s in held])
    # against one oracle call instead of the fastest of the sample's measurements
    single = P.accuracy([s["e2e_first_ms"] for s in held], [pred.predict_features(s["kernels"]) for s in held])
    # the same regressor against the contention-free target: the sum of in-graph kernel times
    kernel_sum = P.KernelLatencyPredictor("host", target="kernel_sum_ms").fit(fit).evaluate(held)
    return {"fit_networks": len(fit), "held_out_networks": len(held), "target": pred.target,
            "kernel_sum_within_10": kernel_sum.within_10, "kernel_sum_mape": kernel_sum.mape,
            "within_10": ev.within_10, "rmse_ms": ev.rmse_ms, "mape": ev.mape, "median_ape": ev.median_ape,
            "fit_s": round(fit_s, 2), "predictions_per_s": reps * len(nets) / (time.perf_counter() - t),
            "noise_floor_within_10": floor.within_10, "single_call_within_10": single.within_10, "sessions": sessions,
            "tuning_state": P.TUNING_STATE}


def section_search(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from benchmarks.bench_nas import bench_autonas
    from omnic import engine
    from omnic.core.measure import MeasureConfig
    from omnic.oracle import LatencyStore, Oracle

    cache = out / "cache-search"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["OMNIC_CACHE_DIR"] = str(cache)
    torch.set_num_threads(1)
    oracle = Oracle(LatencyStore(cache / "latency.sqlite"), MeasureConfig(min_repeat_ms=20, repeats=5, max_rounds=2, time_budget_s=0.1),
                    compile_fn=engine.compile)
    nas_args = argparse.Namespace(size=16, width=32, epochs=args.search_epochs, measurements=args.search_measurements,
                                  population=20, generations=args.search_generations, seeds=[0])
    t = time.perf_counter()
    res = bench_autonas(nas_args, oracle, cache)
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


# ---------------------------------------------------------------------------------- orchestration
def _sections(args: argparse.Namespace) -> list[str]:
    names = [f"tuned-{m}" for m in args.models] + [f"compile-memory-{m}" for m in args.models]
    return names + ["oracle", "predictor", "search"]


def run_section(name: str, args: argparse.Namespace, out: Path) -> dict:
    t = time.perf_counter()
    if name.startswith("tuned-"):
        res = section_tuned(args, name[len("tuned-"):], out)
    elif name.startswith("compile-memory-"):
        res = section_compile_memory(args, name[len("compile-memory-"):], out)
    else:
        res = globals()[f"section_{name}"](args, out)
    from benchmarks.common import machine_line

    res.update(section_wall_s=round(time.perf_counter() - t, 1), peak_rss_mb=round(_peak_rss_mb(), 1),
               machine_after=machine_line())
    return res


def _error_cell(error: float | None) -> str:
    """A build whose outputs are off is not a result: say so where its latency is."""
    if error is None:
        return "not checked"
    return f"{error:.1e}" if error <= 1e-4 else f"**WRONG OUTPUTS ({error:.2g})**"


def report(args: argparse.Namespace, out: Path) -> str:
    r = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    lines = [f"# omnic headline figures (`host`, {args.threads} threads, batch 1)", ""]
    lines += ["## Tuned latency vs ONNX Runtime and PyTorch eager (medians of interleaved rounds, one process)", "",
              "| model | tuning | trials | omnic per call | omnic TVM timer | ONNX Runtime | torch eager | "
              "omnic/ORT | omnic/ORT within rounds (range) | omnic/eager | run-to-run spread omnic / ORT / eager "
              "| omnic vs PyTorch (max rel. error) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for m in args.models:
        t = r.get(f"tuned-{m}")
        if not t:
            continue
        for row in t["rows"]:
            med, sp = row["median_ms"], row["spread"]
            run_minutes = row.get("run_minutes", t["rows"][-1]["minutes"])
            own_run = run_minutes == row["minutes"]
            tuning_cell = f"{row['minutes']:g} min" + ("" if own_run else f" (copy of the {run_minutes:g}-min run)")
            trials = row.get("run_trials", t["trials"]) if own_run else ""
            lines.append(f"| {m} | {tuning_cell} | {trials} "
                         f"| {med['omnic']:.3f} ms | {med['omnic_native']:.3f} ms | {med['ort']:.3f} ms "
                         f"| {med['torch']:.3f} ms | **{row['ratio_omnic_ort']:.2f}** "
                         f"| {row['ratio_rounds_omnic_ort']:.2f} ({row['ratio_rounds_range'][0]:.2f}-"
                         f"{row['ratio_rounds_range'][1]:.2f}) | {row['ratio_omnic_torch']:.2f} "
                         f"| {100 * sp['omnic']:.1f}% / {100 * sp['ort']:.1f}% / {100 * sp['torch']:.1f}% "
                         f"| {_error_cell(row.get('max_rel_error'))} |")
    for m in args.models:
        t = r.get(f"tuned-{m}")
        if t:
            total = sum(k["total_ms"] for k in t["top_kernels"]) or 1.0
            top = ", ".join(f"{k['name']} x{k['calls']} {k['total_ms']:.3f} ms" for k in t["top_kernels"][:5])
            runs = "; ".join(f"{r['minutes']:g}-min run {r['tuning_wall_s']:.0f} s, {r['trials']} trials, "
                             f"{r['tasks_tuned']}/{r['tasks']} tasks tuned" for r in t.get("runs", []))
            lines.append(f"\n{m}: " + (runs or f"tuning {t['tuning_wall_s']:.0f} s, {t['trials']} trials, "
                                       f"{t['tasks_tuned']}/{t['tasks']} tasks tuned")
                         + f"; Winograd convs per row: {[row.get('winograd_convs') for row in t['rows']]}; top kernels of the final build (instrumented, each call's "
                         f"fastest): {top} "
                         f"(these five: {100 * sum(k['total_ms'] for k in t['top_kernels'][:5]) / total:.0f}% "
                         f"of the top ten)")
            lines += conv_table(m, t.get("conv_by_conv"))
    lines += ["", "## Oracle, predictor, search, memory", "", "| figure | value |", "|---|---|"]
    o = r.get("oracle")
    if o:
        lines += [f"| oracle: distinct candidates / min, warm tuning database ({o['candidates']} conv nets "
                  f"{o['input'][-2]}x{o['input'][-1]}, empty latency store; trials in the warm pass: "
                  f"{o['warm_pass_trials']}) | **{o['warm_db_per_min']:.1f}** |",
                  f"| oracle: distinct candidates / min, untuned | {o['untuned_per_min']:.1f} |",
                  f"| oracle: distinct candidates / min, cold database (tunes each new workload, "
                  f"{o['trials_per_candidate']} trials) | {o['cold_tuning_per_min']:.1f} |",
                  f"| oracle: stored lookups / s (asking again; trace + hash + SQLite read) | "
                  f"{o['stored_lookups_per_s']:.0f}" + (f" (median {o['stored_lookup_ms']['median']:.1f} ms, mean {o['stored_lookup_ms']['mean']:.1f} ms, "
                  f"max {o['stored_lookup_ms']['max']:.1f} ms of {o['stored_lookup_ms']['n']})"
                  if "stored_lookup_ms" in o else "") + " |",
                  f"| oracle: run-to-run spread of one candidate, {len(o['same_model_medians_ms'])} fresh measurements "
                  f"| {100 * o['same_model_spread']:.1f}% |"]
    p = r.get("predictor")
    if p:
        lines += [f"| predictor (`host`, {p['tuning_state']} kernels, target {p['target']}, the fastest of the "
                  f"oracle's measurements over {p.get('sessions', 2)} sessions): held-out within +-10% "
                  f"({p['held_out_networks']} networks, fit on {p['fit_networks']}) | **{100 * p['within_10']:.1f}%** |",
                  f"| predictor: RMSE / mean abs error / median abs error | {p['rmse_ms']:.2f} ms / "
                  f"{100 * p['mape']:.1f}% / {100 * p['median_ape']:.1f}% |",
                  f"| predictor: against the sum of in-graph kernel times instead (no contention between "
                  f"kernels): within +-10% / mean abs error | {100 * p['kernel_sum_within_10']:.1f}% / "
                  f"{100 * p['kernel_sum_mape']:.1f}% |",
                  f"| predictor: network predictions / s (batched) | {p['predictions_per_s']:.0f} |",
                  f"| predictor: noise floor (two independent estimates of the same binary, within +-10%) "
                  f"| {100 * p['noise_floor_within_10']:.1f}% |",
                  f"| predictor: within +-10% of a single oracle call (not the fastest over the sessions) "
                  f"| {100 * p.get('single_call_within_10', float('nan')):.1f}% |"]
    s = r.get("search")
    if s:
        for row in s["rows"]:
            lines.append(f"| AutoNAS vs random, budget {row['budget_ms']} ms, {row['autonas_measurements']} vs "
                         f"{row['random_measurements']} measurements | accuracy {100 * row['autonas_acc']:.2f}% vs "
                         f"{100 * row['random_acc']:.2f}%; wall {row['autonas_wall_s']} s vs {row['random_wall_s']} s |")
        lines.append(f"| search section (supernet training {s['train_s']} s + searches) wall / peak RSS "
                     f"| {s['section_wall_s']:.0f} s / {s['peak_rss_mb']:.0f} MB |")
    for m in args.models:
        c = r.get(f"compile-memory-{m}")
        if c:
            lines.append(f"| compile {m} (tuned database, no tuning): wall / peak RSS (RSS before compile) "
                         f"| {c['compile_s']} s / {c['peak_rss_mb']:.0f} MB ({c['rss_before_mb']:.0f} MB) |")
        t = r.get(f"tuned-{m}")
        if t:
            lines.append(f"| tune + compile + measure {m}: peak RSS | {t['peak_rss_mb']:.0f} MB |")
    machines = sorted({v.get("machine_after", "") for v in r.values()})
    lines += ["", "Machine (after each section): " + "; ".join(machines)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/headline")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--tune-minutes", nargs="+", type=float, default=[5.0, 15.0, 30.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved measurement rounds per framework")
    ap.add_argument("--min-time-s", type=float, default=0.4)
    # the search settings default to omnic's own (TuningConfig), so the benchmark measures what users get
    ap.add_argument("--per-iter", type=int, default=None)
    ap.add_argument("--population", type=int, default=None)
    ap.add_argument("--genetic-iters", type=int, default=None)
    ap.add_argument("--builder", default="auto", choices=("auto", "inproc", "pool", "local"))
    ap.add_argument("--cold-cache-repeats", type=int, default=10,
                    help="measure tuning candidates cold (N flushed single runs); 0: hot")
    ap.add_argument("--oracle-candidates", type=int, default=12)
    ap.add_argument("--oracle-trials", type=int, default=32, help="tuning trials per candidate (cold pass)")
    ap.add_argument("--oracle-repeat", type=int, default=5)
    ap.add_argument("--predictor-fit", type=int, default=90)
    ap.add_argument("--predictor-eval", type=int, default=30)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--search-measurements", type=int, default=12)
    ap.add_argument("--search-generations", type=int, default=5)
    ap.add_argument("--only", nargs="+", default=None, help="run just these sections")
    ap.add_argument("--progress", action="store_true", help="tuning progress bars")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in minutes (small budgets; the figures mean little)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.tune_minutes, args.rounds, args.min_time_s = ["mobilenet_v2"], [0.5, 1.0], 2, 0.3
        args.oracle_candidates, args.oracle_trials, args.oracle_repeat = 4, 32, 2
        args.predictor_fit, args.predictor_eval = 6, 3
        args.search_epochs, args.search_measurements, args.search_generations = 1, 4, 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.section:  # a child: run one section and write its file
        res = run_section(args.section, args, out)
        tmp = out / f".{args.section}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=float))
        tmp.replace(out / f"{args.section}.json")
        return 0

    from benchmarks.common import machine_line

    print(f"machine: {machine_line()}", flush=True)
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads)}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    failed = []
    for name in _sections(args):
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        if (out / f"{name}.json").exists():
            print(f"== {name}: done earlier ({out / f'{name}.json'}), skipped", flush=True)
            continue
        print(f"== {name} ...", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, __file__, *passthrough, "--section", name], env=env, cwd=ROOT)
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    text = report(args, out)
    (out / "headline.md").write_text(text + "\n")
    print("\n" + text)
    if failed:
        print(f"\nfailed sections: {failed}; rerun the same command to retry just those", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
