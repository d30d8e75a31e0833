"""Good code without tuning: omnic's default CPU schedules against ONNX Runtime and PyTorch eager.

Three tables, each measured in one process:

- ``untuned``: the zoo's MobileNetV2, ResNet-18, MobileNetV3-Small and conv+attention net at
  224x224, built with no tuning database (every kernel default-scheduled), against eager and ORT
  in interleaved rounds (``benchmarks.common.side_by_side``), with compile time and what the
  report says about the kernels' schedules;
- ``fidelity``: random subnets of two supernets (MobileNetV3-Small at 128x128, ResNet-18 at
  96x96), each measured untuned with ``engine.get_latency`` and with ORT: Spearman rank
  correlation and the share of pairs in the same order;
- ``transfer``: MobileNetV2 tuned at width 1.0 for ``--tune-s`` seconds, then width 0.75 and 0.5
  built from that database (transferred schedules) against their default build and, with
  ``--full``, their own tuning with the same budget.

usage:
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_defaults.py untuned [--rounds 9]
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_defaults.py fidelity [--subnets 12] [--fidelity-sizes 224 224]
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_defaults.py transfer [--tune-s 300] [--full]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("mobilenet_v2", "resnet18", "mobilenet_v3_small", "conv_attention")


def _fresh_cache(label: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"omnic-bench-{label}-"))
    os.environ["OMNIC_CACHE_DIR"] = str(path)
    return path


def untuned(args: argparse.Namespace) -> list[dict]:
    import torch
    from benchmarks.common import side_by_side
    from omnic import engine
    from omnic.examples.zoo import get_model

    rows = []
    for name in args.models.split(","):
        _fresh_cache("untuned")
        model, x = get_model(name, input_shape=(1, 3, args.size, args.size))
        t0 = time.perf_counter()
        dm = engine.compile(model, {"device": "host", "threads": args.threads}, x, progress=False)
        compile_s = time.perf_counter() - t0
        res = side_by_side(model, x, dm, threads=args.threads, rounds=args.rounds, label=name)
        med = res["median_ms"]
        rows.append({"model": name, "input": f"1x3x{args.size}x{args.size}", "omnic_ms": med["omnic"],
                     "ort_ms": med["ort"], "eager_ms": med["torch"],
                     "omnic_ort": res["ratio_rounds_omnic_ort"], "omnic_eager": med["omnic"] / med["torch"],
                     "compile_s": compile_s, "schedules": dm.report["schedules"],
                     "max_rel_error": dm.report["max_rel_error"]})
        torch.set_num_threads(args.threads)
    print("\n| model | input | omnic ms | ORT ms | eager ms | omnic/ORT (median of rounds) | omnic/eager "
          "| compile s | kernels default / unscheduled | max rel err |")
    print("|" + "---|" * 10)
    for r in rows:
        s = r["schedules"]
        print(f"| {r['model']} | {r['input']} | {r['omnic_ms']:.2f} | {r['ort_ms']:.2f} | {r['eager_ms']:.2f} "
              f"| {r['omnic_ort']:.2f} | {r['omnic_eager']:.2f} | {r['compile_s']:.1f} "
              f"| {s['default']} / {s['unscheduled']} | {r['max_rel_error']:.1e} |")
    return rows


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def _pairs_same_order(a: list[float], b: list[float]) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    return sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) / len(pairs)


def fidelity(args: argparse.Namespace) -> list[dict]:
    import random

    import torch
    from benchmarks.common import onnxruntime_ms
    from omnic import engine, nas
    from omnic.examples.zoo import get_model

    _fresh_cache("fidelity")
    torch.set_num_threads(args.threads)
    rows = []
    sizes = args.fidelity_sizes or (128, 96)
    for name, size in zip(("mobilenet_v3_small", "resnet18"), sizes):
        model, x = get_model(name, input_shape=(1, 3, size, size))
        omni = nas.omnimize(model, example_inputs=x)
        rng = random.Random(args.seed)
        ours, ort = [], []
        for i in range(args.subnets):
            sub = omni.export(omni.sample(rng)).eval()
            ours.append(engine.get_latency(sub, {"device": "host", "threads": args.threads}, x))
            time.sleep(0.2)
            ort.append(min(onnxruntime_ms(sub, x, args.threads)[0] for _ in range(3)))
            print(f"[{name}] subnet {i + 1}/{args.subnets}: omnic {ours[-1]:.3f} ms, ORT {ort[-1]:.3f} ms", flush=True)
        ratios = sorted(a / b for a, b in zip(ours, ort))
        rows.append({"supernet": name, "input": f"{size}x{size}", "subnets": args.subnets,
                     "spearman": _spearman(ours, ort), "pairs_same_order": _pairs_same_order(ours, ort),
                     "median_omnic_ort": ratios[len(ratios) // 2], "omnic_ms": ours, "ort_ms": ort})
    print("\n| supernet | input | subnets | Spearman (omnic untuned vs ORT) | pairs in ORT's order "
          "| median omnic/ORT |")
    print("|" + "---|" * 6)
    for r in rows:
        print(f"| {r['supernet']} | {r['input']} | {r['subnets']} | {r['spearman']:.3f} "
              f"| {100 * r['pairs_same_order']:.0f} % | {r['median_omnic_ort']:.2f} |")
    return rows


def transfer(args: argparse.Namespace) -> list[dict]:
    from omnic import engine
    from omnic.examples.zoo import calibrate_bn, mobilenet_v2
    import torch

    torch.set_num_threads(args.threads)
    shape = (1, 3, args.size, args.size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))

    def model(width):
        torch.manual_seed(0)
        return calibrate_bn(mobilenet_v2(width_mult=width), shape).eval()

    dep = {"device": "host", "threads": args.threads}
    tuned_dep = {**dep, "tuning_time_s": args.tune_s}
    base_cache = _fresh_cache("transfer")
    t0 = time.perf_counter()
    base_tuned = engine.compile(model(1.0), tuned_dep, x, progress=False)
    tune_wall = time.perf_counter() - t0
    # the tuned base against its default build and ORT, in one process: tuning must not lose
    # to the defaults it started from
    from benchmarks.common import onnxruntime_ms
    _fresh_cache("base-default")
    base_default = engine.compile(model(1.0), dep, x, progress=False)
    base = {"tuned": [], "default": [], "ort": []}
    for _ in range(5):
        base["tuned"].append(base_tuned.measure().median_ms)
        base["default"].append(base_default.measure().median_ms)
        base["ort"].append(onnxruntime_ms(model(1.0), x, args.threads)[0])
    base = {k: sorted(v)[len(v) // 2] for k, v in base.items()}
    print(f"base x1.0: tuned {base['tuned']:.3f} ms, default {base['default']:.3f} ms, ORT {base['ort']:.3f} ms; "
          f"schedules {base_tuned.report['schedules']}", flush=True)
    rows = []
    for width in args.widths:
        m = model(width)
        os.environ["OMNIC_CACHE_DIR"] = str(base_cache)
        t0 = time.perf_counter()
        transferred = engine.compile(m, dep, x, progress=False)
        build_s = time.perf_counter() - t0
        _fresh_cache("default")
        default = engine.compile(m, dep, x, progress=False)
        full = None
        if args.full:
            _fresh_cache("full")
            full = engine.compile(m, tuned_dep, x, progress=False)
        times = {"transferred": transferred.get_latency(), "default": default.get_latency()}
        if full is not None:
            times["tuned"] = full.get_latency()
        rows.append({"width": width, **{f"{k}_ms": v for k, v in times.items()}, "build_s": build_s,
                     "schedules": transferred.report["schedules"]})
        print(rows[-1], flush=True)
    print(f"\nbase: MobileNetV2 x1.0 at {args.size}x{args.size} tuned {args.tune_s} s (wall {tune_wall:.0f} s): "
          f"tuned {base['tuned']:.2f} ms, default {base['default']:.2f} ms, ORT {base['ort']:.2f} ms "
          f"(tuned/default {base['tuned'] / base['default']:.2f}, tuned/ORT {base['tuned'] / base['ort']:.2f}; "
          f"medians of 5 interleaved rounds), kernels {base_tuned.report['schedules']}")
    print("| width | default ms | transferred ms | own tuning ms | transferred / tuned | build s | kernels "
          "tuned / transferred / default |")
    print("|" + "---|" * 7)
    for r in rows:
        tuned = r.get("tuned_ms")
        s = r["schedules"]
        own = "-" if tuned is None else f"{tuned:.2f}"
        ratio = "-" if tuned is None else f"{r['transferred_ms'] / tuned:.2f}"
        print(f"| {r['width']} | {r['default_ms']:.2f} | {r['transferred_ms']:.2f} | {own} | {ratio} "
              f"| {r['build_s']:.1f} | {s['tuned']} / {s['transferred']} / {s['default']} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=("untuned", "fidelity", "transfer"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--subnets", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune-s", type=float, default=300.0)
    p.add_argument("--widths", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--fidelity-sizes", type=int, nargs=2, help="fidelity: input sizes of the two supernets "
                   "(default 128 96)")
    p.add_argument("--full", action="store_true", help="transfer: also tune each width with the same budget")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from benchmarks.common import machine_line

    print(f"machine: {machine_line()}; threads {args.threads}")
    rows = {"untuned": untuned, "fidelity": fidelity, "transfer": transfer}[args.table](args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
