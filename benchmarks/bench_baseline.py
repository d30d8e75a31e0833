"""Baseline: omnic (untuned) vs PyTorch eager vs ONNX Runtime on the zoo, batch 1, same threads.

usage: python benchmarks/bench_baseline.py [--models resnet18,mobilenet_v2] [--threads 2] [--small]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine_line, omnic_ms, onnxruntime_ms, torch_eager_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet_small,conv_attention,mobilenet_v3_small,mobilenet_v2,resnet18")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="use the zoo's test shapes (fast)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before omnic/tvm import
    from omnic import engine
    from omnic.examples.zoo import ZOO, get_model

    print(f"machine: {machine_line()}; threads {args.threads}; omnic untuned (tuning_trials=0)")
    header = ("| model | input | omnic per call ms | omnic native ms | PyTorch eager ms | ONNX Runtime ms "
              "| omnic/ORT | omnic/eager | max rel err | compile s |")
    print(header)
    print("|" + "---|" * 10)
    for name in args.models.split(","):
        shape = ZOO[name].test_shape if args.small else ZOO[name].input_shape
        model, x = get_model(name, input_shape=shape)
        t0 = time.perf_counter()
        dm = engine.compile(model, {"device": "host", "threads": args.threads}, x)
        compile_s = time.perf_counter() - t0
        time.sleep(1)
        ours, native = omnic_ms(dm, x)
        time.sleep(1)
        eager = torch_eager_ms(model, x, args.threads)
        time.sleep(1)
        ort_ms, _ = onnxruntime_ms(model, x, args.threads)
        print(f"| {name} | {'x'.join(map(str, shape))} | {ours:.3f} | {native:.3f} | {eager:.3f} | {ort_ms:.3f} "
              f"| {ours / ort_ms:.2f} | {ours / eager:.2f} | {dm.report['max_rel_error']:.1e} | {compile_s:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
