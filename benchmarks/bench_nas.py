"""NAS benchmarks on real digits (scikit-learn), measured on ``host``.

AutoNAS vs random search with the same number of exact oracle measurements (best validation
accuracy under two measured latency budgets, wall time, Pareto plot), and FastNAS vs uniform
width scaling at equal measured latency (accuracy after the same fine-tuning, wall time).

    .venv/bin/python benchmarks/bench_nas.py [--out benchmarks/results] [--quick]

Writes ``nas.json``, ``nas.md`` and ``nas_pareto_*.png`` to ``--out``. Latencies come from a
fresh latency store in a temporary folder, so wall times include every compile + measurement.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from omnic import engine, nas
from omnic.core.measure import MeasureConfig
from omnic.oracle import LatencyStore, Oracle
from omnic.examples.digits import DigitsCNN, DigitsResNet, accuracy, accuracy_fn, digits_loaders, train_plain
from omnic.search.result import plot_pareto
from omnic.search.train import recalibrate_bn


def _measure(oracle, module, x) -> float:
    m = oracle.measure(module.eval(), "host", x)
    assert m.ok, m.error
    return float(m.median_ms)


def bench_autonas(args, oracle, out: Path) -> dict:
    size = args.size
    train, val = digits_loaders(size=size, seed=0)
    calib = torch.utils.data.DataLoader(train.dataset, batch_size=64, shuffle=False)
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size)
    # widths in multiples of the host's channel_multiple: aligned channels are what the device runs well
    omni = nas.omnimize(DigitsResNet(width=args.width, blocks=(2, 2)), example_inputs=x, deployment="host")
    t = time.perf_counter()
    nas.train_supernet(omni, train, epochs=args.epochs, lr=0.1)
    train_s = time.perf_counter() - t
    lo = _measure(oracle, omni.export(omni.canonical(omni.min())), x)
    hi = _measure(oracle, omni.export(omni.max()), x)
    budgets = [round(lo + f * (hi - lo), 4) for f in (0.25, 0.5)]
    score = accuracy_fn(val)
    rows = []
    for budget in budgets:
        for seed in args.seeds:
            common = dict(oracle=oracle, calib_loader=calib, calib_batches=2, max_measurements=args.measurements,
                          seed=seed)
            t = time.perf_counter()
            auto = nas.search(omni, {"latency": budget}, "host", score, population=args.population, parents=4,
                              generations=args.generations, verify_per_generation=2, **common)
            auto_s = time.perf_counter() - t
            t = time.perf_counter()
            rnd = nas.search(omni, {"latency": budget}, "host", score, mode="random", **common)
            rnd_s = time.perf_counter() - t
            rows.append({"budget_ms": budget, "seed": seed, "autonas_acc": auto.score, "autonas_ms": auto.latency_ms,
                         "autonas_measurements": auto.measurements, "autonas_wall_s": round(auto_s, 1),
                         "random_acc": rnd.score, "random_ms": rnd.latency_ms,
                         "random_measurements": rnd.measurements, "random_wall_s": round(rnd_s, 1),
                         "autonas_config": auto.config})
            print(json.dumps(rows[-1]), flush=True)
            if seed == args.seeds[0]:
                plot_pareto([auto, rnd], out / f"nas_pareto_{budget}ms.png", labels=["AutoNAS", "random"],
                            title=f"digits {size}x{size}, budget {budget} ms on host")
                auto.save(out / "autonas_run", name=f"autonas_{budget}ms")
    return {"size": size, "space_subnets": omni.space.num_subnets, "train_s": round(train_s, 1),
            "min_ms": lo, "max_ms": hi, "budgets_ms": budgets, "rows": rows}


def _uniform(omni, ratio: float) -> dict:
    cfg = {}
    for name, ch in omni.space.choices.items():
        target = ratio * ch.max
        cfg[name] = min(ch.values, key=lambda v: (abs(v - target), v))
    return cfg


def bench_fastnas(args, oracle, out: Path) -> dict:
    size = args.size
    train, val = digits_loaders(size=size, seed=0)
    calib = torch.utils.data.DataLoader(train.dataset, batch_size=64, shuffle=False)
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size)
    base = DigitsCNN(widths=(32, 64, 96))
    train_plain(base, train, epochs=args.epochs, lr=0.05)
    base_acc = accuracy(base, val)
    full_ms = _measure(oracle, base, x)
    omni = nas.omnimize(base, mode="fastnas", example_inputs=x, divisor=8)
    min_ms = _measure(oracle, omni.export(omni.min()), x)
    ckpt = Path(tempfile.mkdtemp(prefix="fastnas-bench-"))
    rows = []
    for frac in (0.5, 0.3):
        budget = round(min_ms + frac * (full_ms - min_ms), 4)
        t = time.perf_counter()
        r = nas.search(omni, {"latency": budget}, "host", accuracy_fn(val), oracle=oracle, calib_loader=calib,
                       calib_batches=4, checkpoint_dir=ckpt)
        wall = time.perf_counter() - t
        # uniform width scaling: the widest uniform ratio whose measured latency is <= FastNAS's
        uni_cfg, uni_ms = None, None
        for ratio in [i / 16 for i in range(16, 0, -1)]:
            cfg = _uniform(omni, ratio)
            ms = _measure(oracle, omni.export(cfg), x)
            if ms <= r.latency_ms:
                uni_cfg, uni_ms = cfg, ms
                break
        uni = omni.export(uni_cfg or omni.min())
        recalibrate_bn(uni, calib, 4)
        uni_before = accuracy(uni, val)
        nas.finetune(uni, train, epochs=args.finetune, lr=0.02)
        uni_after = accuracy(uni, val)
        nas.finetune(r, train, epochs=args.finetune, lr=0.02, score_fn=accuracy_fn(val))
        rows.append({"budget_ms": budget, "fastnas_ms": r.latency_ms, "fastnas_config": r.config,
                     "fastnas_acc_before_ft": r.scores["before_finetune"], "fastnas_acc_after_ft": r.scores["after_finetune"],
                     "uniform_ms": uni_ms, "uniform_config": uni_cfg, "uniform_acc_before_ft": uni_before,
                     "uniform_acc_after_ft": uni_after, "fastnas_wall_s": round(wall, 1),
                     "sensitivity_s": r.info["sensitivity_s"], "sensitivity_reused": r.info["sensitivity_reused"],
                     "measurements": r.measurements})
        print(json.dumps(rows[-1]), flush=True)
    return {"size": size, "base_acc": base_acc, "full_ms": full_ms, "min_ms": min_ms, "rows": rows,
            "finetune_epochs": args.finetune}


def markdown(res: dict) -> str:
    a, f = res["autonas"], res["fastnas"]
    lines = ["### AutoNAS", "",
             f"DigitsResNet(width={res['args']['width']}) supernet on digits {a['size']}x{a['size']} ({a['space_subnets']} subnets), "
             f"sandwich-trained {res['args']['epochs']} epochs ({a['train_s']} s); host latency of the smallest/"
             f"largest subnet {a['min_ms']:.4f} / {a['max_ms']:.4f} ms. Same number of exact measurements for both.",
             "", "| budget (ms) | seed | AutoNAS acc | AutoNAS ms | random acc | random ms | measurements | "
             "AutoNAS wall (s) | random wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in a["rows"]:
        lines.append(f"| {r['budget_ms']} | {r['seed']} | {r['autonas_acc']:.4f} | {r['autonas_ms']:.4f} | "
                     f"{r['random_acc']:.4f} | {r['random_ms']:.4f} | {r['autonas_measurements']} / "
                     f"{r['random_measurements']} | {r['autonas_wall_s']} | {r['random_wall_s']} |")
    lines += ["", "### FastNAS", "",
              f"DigitsCNN(32, 64, 96) trained {res['args']['epochs']} epochs (val acc {f['base_acc']:.4f}, "
              f"{f['full_ms']:.4f} ms); narrowest {f['min_ms']:.4f} ms. Both pruned models fine-tuned "
              f"{f['finetune_epochs']} epoch(s) identically.", "",
              "| budget (ms) | FastNAS ms | FastNAS acc (before -> after ft) | uniform ms | uniform acc "
              "(before -> after ft) | FastNAS wall (s) | sensitivity (s) | reused map |",
              "|---|---|---|---|---|---|---|---|"]
    for r in f["rows"]:
        uni_ms = "n/a" if r["uniform_ms"] is None else f"{r['uniform_ms']:.4f}"
        lines.append(f"| {r['budget_ms']} | {r['fastnas_ms']:.4f} | {r['fastnas_acc_before_ft']:.4f} -> "
                     f"{r['fastnas_acc_after_ft']:.4f} | {uni_ms} | {r['uniform_acc_before_ft']:.4f} -> "
                     f"{r['uniform_acc_after_ft']:.4f} | {r['fastnas_wall_s']} | {r['sensitivity_s']} | "
                     f"{r['sensitivity_reused']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=int, default=32, help="DigitsResNet width of the AutoNAS supernet")
    p.add_argument("--finetune", type=int, default=2)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--measurements", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", choices=("autonas", "fastnas"))
    args = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared; contended threads slow PyTorch several-fold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="nas-bench-")) / "latency.sqlite"
    oracle = Oracle(LatencyStore(store), MeasureConfig(min_repeat_ms=20, repeats=5, max_rounds=2, time_budget_s=0.1),
                    compile_fn=engine.compile)
    res = {"args": vars(args)}
    t = time.perf_counter()
    if args.only != "fastnas":
        res["autonas"] = bench_autonas(args, oracle, out)
    if args.only != "autonas":
        res["fastnas"] = bench_fastnas(args, oracle, out)
    res["total_s"] = round(time.perf_counter() - t, 1)
    (out / "nas.json").write_text(json.dumps(res, indent=1, default=float))
    if "autonas" in res and "fastnas" in res:
        (out / "nas.md").write_text(markdown(res))
        print(markdown(res))
    print(f"total {res['total_s']} s")


if __name__ == "__main__":
    main()
