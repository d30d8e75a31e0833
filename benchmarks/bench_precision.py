"""Precision benchmark: int8 vs fp32 latency on host at the same tuning budget, and digits accuracy.

usage: python benchmarks/bench_precision.py [--models resnet18,mobilenet_v2,conv3x3] [--trials 0]
                                            [--input 224] [--threads 2] [--no-digits] [--json out.json]

Latency: each model is compiled for ``host`` in fp32 and in int8 with the same MetaSchedule
budget (``tuning_trials`` per model; 0 = untuned), then timed with TVM's native timer (median
of repeats). The int8 build is calibrated on a few random batches (latency does not depend on
the scales). Tuning databases go to ``$OMNIC_CACHE_DIR/fp32`` and ``$OMNIC_CACHE_DIR/int8`` when
it is set (default: both into ``~/.cache/omnic``); set it to a fresh folder for a cold-start run.

Accuracy: a small CNN trained on scikit-learn's digits (16x16) for a few epochs, top-1 on the
held-out quarter in PyTorch fp32 and in the compiled int8 model (minmax and percentile).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def bench_latency(name: str, input_size: int, trials: int, threads: int, fp32_trials: int | None = None,
                  time_s: float | None = None) -> dict:
    import torch

    from omnic import engine
    from omnic.compile import tuning
    from omnic.examples.zoo import get_model

    if name == "conv3x3":  # one ResNet-18 layer-1 conv (+ReLU), 64->64 at 56x56: the kernel alone
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).eval()
        x = torch.randn(1, 64, 56, 56)
    else:
        model, x = get_model(name, input_shape=(1, 3, input_size, input_size))
    calib = [torch.randn_like(x) for _ in range(4)]
    row: dict = {"model": name, "input": list(x.shape), "trials": trials, "time_s": time_s}
    # a time budget uses the cheaper search of the tuned-latency benchmarks (more trials per minute)
    config = tuning.TuningConfig(trials_per_iter=8, population_size=64, genetic_num_iters=1) if time_s \
        else tuning.TuningConfig()
    root = os.environ.get("OMNIC_CACHE_DIR")
    for precision in ("fp32", "int8"):
        budget = fp32_trials if (precision == "fp32" and fp32_trials is not None) else trials
        if root:  # each precision tunes into its own database: no workload is tuned for free
            os.environ["OMNIC_CACHE_DIR"] = os.path.join(root, precision)
        dep = {"device": "host", "precision": precision, "threads": threads, "tuning_trials": budget,
               "tuning_time_s": time_s}
        t0 = time.perf_counter()
        kwargs = {"calibration": calib} if precision == "int8" else {}
        with tuning.using(config):
            dm = engine.compile(model, dep, x, progress=False, **kwargs)
        row[f"{precision}_compile_s"] = round(time.perf_counter() - t0, 1)
        m = dm.measure()
        row[f"{precision}_ms"] = round(m.median_ms, 3)
        row[f"{precision}_spread"] = round(m.spread, 3)
        row[f"{precision}_max_rel_error"] = dm.report["max_rel_error"]
        row[f"{precision}_tuning"] = {k: dm.report["tuning"].get(k) for k in ("tasks", "tasks_in_database", "trials",
                                                                            "wall_s", "stopped_by_time")}
        # where the time goes (after the measurement, which must not run under the instrument hook)
        from omnic.compile import profiler

        rt = dm.runtime
        kernels = profiler.kernel_times(rt.vm, rt.dev, [rt.to_device(a) for a in dm.random_inputs()])
        row[f"{precision}_kernels"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                       for r in kernels[:20]]
        if precision == "int8":
            row["int8_ops"] = dm.report["ops_precision"]["int8"]
            row["vnni_packed_convs"] = dm.report["quantization"].get("dot_product_packed_convs")
            asm = dm.executable.mod.imports[0].inspect_source("asm")
            row["vpdpbusd_in_asm"] = asm.count("vpdpbusd")
    if root:
        os.environ["OMNIC_CACHE_DIR"] = root
    row["int8_over_fp32"] = round(row["int8_ms"] / row["fp32_ms"], 3)
    return row


def bench_digits() -> dict:
    import torch

    from omnic import engine
    from omnic.examples.digits import digits_data, evaluate, train_digits_cnn

    data = digits_data()
    t0 = time.perf_counter()
    model = train_digits_cnn(data)
    row: dict = {"train_s": round(time.perf_counter() - t0, 1), "test_samples": len(data.y_test) // 64 * 64}
    row["fp32_pytorch"] = evaluate(model, data.x_test, data.y_test, batch=64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64)
    dm = engine.compile(model, {"device": "host"}, data.x_test[:64], progress=False)
    row["fp32_omnic"] = evaluate(dm, data.x_test, data.y_test, batch=64)
    for method in ("minmax", "percentile"):
        dm = engine.compile(model, {"device": "host", "precision": "int8"}, data.x_test[:64], calibration=loader,
                            quantization=method, progress=False)
        row[f"int8_{method}"] = evaluate(dm, data.x_test, data.y_test, batch=64)
        row[f"int8_{method}_report"] = dm.report["quantization"]["accuracy"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--input", type=int, default=224)
    parser.add_argument("--trials", type=int, default=0, help="tuning trials per model and precision")
    parser.add_argument("--fp32-trials", type=int, default=None,
                        help="fp32 budget when it differs from --trials (e.g. 0 to reuse a database "
                             "already tuned with the same budget)")
    parser.add_argument("--time-s", type=float, default=None,
                        help="tuning time budget per model and precision (instead of a trial budget)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before tvm is imported
    sys.path.insert(0, os.path.dirname(__file__))
    from common import machine_line

    results: dict = {"machine": machine_line(), "threads": args.threads, "latency": [], "digits": None}
    budget = f"{args.time_s:g} s" if args.time_s else f"{args.trials} trials"
    print(f"machine: {results['machine']}; threads {args.threads}; tuning budget per model and precision: {budget}")
    if args.models:
        print("| model | input (CxHxW) | budget | trials fp32 / int8 | fp32 ms | int8 ms | int8/fp32 | int8 ops "
              "| packed VNNI convs | vpdpbusd |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models.split(","):
            r = bench_latency(name, args.input, args.trials, args.threads, args.fp32_trials, args.time_s)
            results["latency"].append(r)
            shape = "x".join(map(str, r["input"][1:]))
            print(f"| {name} | {shape} | {budget} | {r['fp32_tuning']['trials']} / {r['int8_tuning']['trials']} "
                  f"| {r['fp32_ms']} | {r['int8_ms']} | {r['int8_over_fp32']} "
                  f"| {r['int8_ops']} | {r['vnni_packed_convs']} | {r['vpdpbusd_in_asm']} |", flush=True)
    if not args.no_digits:
        d = bench_digits()
        results["digits"] = d
        print(f"digits (test {d['test_samples']}): fp32 PyTorch {d['fp32_pytorch']:.4f}, fp32 omnic "
              f"{d['fp32_omnic']:.4f}, int8 minmax {d['int8_minmax']:.4f}, int8 percentile {d['int8_percentile']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
