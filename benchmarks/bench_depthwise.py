"""What omnic's depthwise design space buys: one model built twice from tuned databases, with and
without the rule, against ONNX Runtime, in one process.

``--rule-db`` is a cache root tuned by this omnic (its depthwise kernels tuned in
``schedule_rules``' space); ``--generic-db`` one tuned before the rule existed, or with it
switched off, whose depthwise kernels come from MetaSchedule's generic rules (e.g. the snapshot
an earlier ``bench_headline.py`` left). For the second build this script switches the rule off
the only way there is: ``schedule_rules.tag_depthwise_kernels`` is replaced by a no-op, so no
block carries the rule's mark and the generic records match again. Both builds are checked
against PyTorch; then the two and ORT are timed per call (torch tensor in and out, median over
a window) in interleaved rounds, same threads, batch 1, and each depthwise kernel of both
builds is timed inside the model (VM instrument hook, each call's fastest).

usage:
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_depthwise.py --model mobilenet_v2 \\
        --rule-db benchmarks/results/headline-dw-znver5/cache-tuned-mobilenet_v2/at-15min \\
        --generic-db benchmarks/results/headline-znver5/cache-tuned-mobilenet_v2/at-15min
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--rule-db", required=True, help="cache root tuned with the depthwise rule")
    p.add_argument("--generic-db", required=True, help="cache root tuned with MetaSchedule's generic rules")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()

    from benchmarks.common import machine_line
    from omnic import Deployment, engine
    from omnic.compile import profiler
    from omnic.compile import rules as schedule_rules
    from omnic.examples import zoo
    from omnic.examples.baselines import onnxruntime_session, per_call_ms

    model, x = zoo.get_model(args.model)
    tag = schedule_rules.tag_depthwise_kernels
    builds = {}
    for name, cache, tagger in (("rule", args.rule_db, tag), ("generic", args.generic_db, lambda mod: mod)):
        os.environ["OMNIC_CACHE_DIR"] = str(Path(cache).resolve())
        schedule_rules.tag_depthwise_kernels = tagger
        try:
            dm = engine.compile(model, Deployment(device="host", threads=args.threads), x, progress=False)
        finally:
            schedule_rules.tag_depthwise_kernels = tag
        if dm.report["kernels_unscheduled"]:
            print(f"warning: {name} build has untuned kernels ({cache} does not hold this model's workloads)")
        builds[name] = dm

    def depthwise_sites(dm):
        names = {gv.name_hint for gv, f in dm.module.functions_items() if "group_conv2d_nhwc" in f.script()}
        rt = dm.runtime
        sites = profiler.call_sites(rt.vm, [rt.to_device(a) for a in dm.random_inputs()], runs=30, sessions=3)
        return [s["fastest_ms"] for s in sites if s["name"] in names]

    kernels = {name: depthwise_sites(dm) for name, dm in builds.items()}
    sess = onnxruntime_session(model, x, args.threads)
    feed = {"x": x.numpy()}
    calls = {name: (lambda dm=dm: dm(x)) for name, dm in builds.items()}
    calls["ort"] = lambda: sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(per_call_ms(fn))

    def within(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, {args.threads} threads, batch 1, {args.rounds} interleaved rounds; machine: {machine_line()}\n")
    print("| build | per call | / ORT (medians) | / ORT within rounds | depthwise kernels (each call's fastest, sum) | max rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in builds:
        print(f"| {name} | {med[name]:.3f} ms | {med[name] / med['ort']:.3f} | {within(name, 'ort'):.3f} | "
              f"{len(kernels[name])} calls, {sum(kernels[name]):.3f} ms | {builds[name].report['max_rel_error']:.1e} |")
    print(f"| ONNX Runtime | {med['ort']:.3f} ms | | | | |")
    print(f"\nrule / generic within rounds: {within('rule', 'generic'):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "times_ms": times, "depthwise_kernels_ms": kernels,
                                               "machine": machine_line()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
