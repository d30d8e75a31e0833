"""Latency predictor benchmark: fit on N zoo variants, evaluate on held-out ones.

    .venv/bin/python benchmarks/bench_predictor.py --fit 56 --eval 20 [--remeasure 8] [--save]

Samples (untuned builds, measured with the standard protocol and the VM instrument hook) are
read from / appended to ``<cache>/predictors/samples-<device>.jsonl``, so a second run only fits
and evaluates. ``--remeasure K`` measures K held-out networks again in this process and reports
how often two measurements of the *same* network agree within +-10%: the noise floor that bounds
any predictor's within-10% figure on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from omnic.oracle import predictor as P


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="host")
    ap.add_argument("--fit", type=int, default=56, help="zoo variants to fit on")
    ap.add_argument("--eval", type=int, default=20, help="held-out zoo variants")
    ap.add_argument("--remeasure", type=int, default=0, help="held-out networks to measure again (noise floor)")
    ap.add_argument("--predict-models", type=int, default=3, help="held-out models to predict from nn.Module")
    ap.add_argument("--save", action="store_true", help="save the fitted predictor as a new version")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    fit_vs = P.fit_variants(args.fit)
    held_vs = P.eval_variants(args.eval, args.fit)
    fit = P.collect(fit_vs, args.device, log=log)
    held = P.collect(held_vs, args.device, log=log)
    t0 = time.perf_counter()
    pred = P.LatencyPredictor(args.device).fit(fit)
    fit_s = time.perf_counter() - t0
    ev = pred.evaluate(held)
    train_ev = pred.evaluate(fit)
    print(ev.table())

    # throughput from features: batched (screening) and one network at a time
    nets = [s["kernels"] for s in held]
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        pred.predict_many(nets)
        reps += 1
    batched = reps * len(nets) / (time.perf_counter() - t0)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        pred.predict_features(nets[n % len(nets)])
        n += 1
    single = n / (time.perf_counter() - t0)
    # from an nn.Module: trace + lower + prepare (no LLVM build) + features + regressor
    model_s = []
    for v in held_vs[:args.predict_models]:
        model, x = v.build()
        t0 = time.perf_counter()
        pred.predict(model, args.device, x)
        model_s.append(time.perf_counter() - t0)

    noise = None
    if args.remeasure:
        first, again = [], []
        for s in held[:args.remeasure]:
            fresh = P.collect_sample(P.Variant.from_dict(s["variant"]), args.device)
            first.append(s["e2e_ms"])
            again.append(fresh["e2e_ms"])
            log(f"remeasure {s['key']}: {s['e2e_ms']:.3f} -> {fresh['e2e_ms']:.3f} ms")
        noise = P.accuracy(first, again, [s["key"] for s in held[:args.remeasure]])

    results = {
        "device": args.device, "tuning_state": P.TUNING_STATE, "fit_networks": len(fit),
        "held_out_networks": len(held), "kernel_samples": pred.info["n_kernel_samples"],
        "within_10": ev.within_10, "rmse_ms": ev.rmse_ms, "mape": ev.mape, "median_ape": ev.median_ape,
        "train_within_10": train_ev.within_10, "train_mape": train_ev.mape,
        "measured_ms_range": [min(s["e2e_ms"] for s in held), max(s["e2e_ms"] for s in held)],
        "fit_s": fit_s, "predictions_per_s_batched": batched, "predictions_per_s_single": single,
        "predict_from_module_s": statistics.median(model_s) if model_s else None,
        "calibration": pred.calibration,
        "remeasure_within_10": noise.within_10 if noise else None,
        "remeasure_mape": noise.mape if noise else None, "remeasure_n": noise.n if noise else 0,
        "rows": [list(r) for r in ev.rows],
    }
    if args.save:
        path = pred.save(extra={"eval": {k: v for k, v in results.items() if k != "rows"}})
        results["saved"] = str(path)
    print(f"\nfit on {len(fit)} networks ({pred.info['n_kernel_samples']} kernels) in {fit_s:.1f} s; "
          f"held-out {len(held)}: within +-10% {100 * ev.within_10:.1f}%, RMSE {ev.rmse_ms:.3f} ms, "
          f"mean |err| {100 * ev.mape:.1f}%, median |err| {100 * ev.median_ape:.1f}% "
          f"(train: within 10% {100 * train_ev.within_10:.1f}%)")
    print(f"predictions/s from features: {batched:.0f} batched, {single:.0f} one at a time; "
          f"from an nn.Module (trace+lower+prepare): {results['predict_from_module_s'] or float('nan'):.2f} s each")
    if noise:
        print(f"noise floor: re-measuring {noise.n} held-out networks, within +-10% of the first "
              f"measurement {100 * noise.within_10:.1f}%, mean |diff| {100 * noise.mape:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
