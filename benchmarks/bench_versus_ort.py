"""Where the time goes: a compiled zoo model against ONNX Runtime, conv by conv.

Compiles the model with the tuning database under ``--cache`` (e.g. a snapshot the headline
benchmark left, ``benchmarks/results/<run>/cache-tuned-<model>/at-15min``), then times every
call inside omnic's build (VM instrument hook) and every node of ONNX Runtime's session (its own
profiler), each call's fastest of ``--runs`` runs in ``--sessions`` sessions a second apart, same
threads, batch 1; pairs the convs and prints where omnic loses and wins.

usage:
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_versus_ort.py --model resnet18 \\
        --cache benchmarks/results/headline-znver4/cache-tuned-resnet18/at-15min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--cache", required=True, help="cache root holding the tuning database")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--sessions", type=int, default=3)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args()
    os.environ["OMNIC_CACHE_DIR"] = str(Path(args.cache).resolve())

    from benchmarks.bench_headline import conv_table
    from benchmarks.common import conv_by_conv, machine_line, ort_node_times, weight_sizes_in_call_order
    from omnic import Deployment, engine
    from omnic.compile import profiler
    from omnic.examples import zoo

    model, x = zoo.get_model(args.model)
    dm = engine.compile(model, Deployment(device="host", threads=args.threads), x, progress=False)
    runtime = dm.runtime
    inputs = [runtime.to_device(a) for a in dm.random_inputs()]
    sites = profiler.call_sites(runtime.vm, inputs, runs=args.runs, sessions=args.sessions)
    nodes = ort_node_times(model, x, args.threads, runs=args.runs, sessions=args.sessions)
    versus = conv_by_conv(sites, nodes, weight_sizes_in_call_order(dm.module))
    omnic_total = sum(s["fastest_ms"] for s in sites)
    ort_total = sum(n["fastest_ms"] for n in nodes)
    print(f"{args.model} ({x.shape[-2]}x{x.shape[-1]}, {args.threads} threads, {dm.report['kernels_scheduled']} tuned "
          f"kernels): sum of each call's fastest: omnic {omnic_total:.3f} ms, ONNX Runtime {ort_total:.3f} ms")
    print("\n".join(conv_table(args.model, versus, top=args.top)))
    print(f"\nmachine: {machine_line()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "omnic_sum_ms": omnic_total,
                                               "ort_sum_ms": ort_total, **versus}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
