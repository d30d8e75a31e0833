"""Latency predictor benchmark: fit on N zoo variants, evaluate on held-out ones.

    .venv/bin/python benchmarks/bench_predictor.py --fit 90 --eval 30 [--remeasure 8] [--save]

Samples (untuned builds, measured with the oracle's protocol in ``--sessions`` sessions minutes
apart, and per kernel with the VM instrument hook) are read from / appended to
``<cache>/predictors/samples-<device>.jsonl``, so a second run only fits and evaluates.
``--remeasure K`` measures K held-out networks in one more session and reports how often it
agrees within +-10% with the stored figure: the noise floor that bounds any predictor's
within-10% figure on this machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


from omnic.oracle import predictor as P


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="host")
    ap.add_argument("--fit", type=int, default=90, help="zoo variants to fit on")
    ap.add_argument("--eval", type=int, default=30, help="held-out zoo variants")
    ap.add_argument("--sessions", type=int, default=2, help="measurement sessions per network (fastest kept)")
    ap.add_argument("--remeasure", type=int, default=0, help="held-out networks to measure again (noise floor)")
    ap.add_argument("--predict-models", type=int, default=3, help="held-out models to predict from nn.Module")
    ap.add_argument("--save", action="store_true", help="save the fitted predictor as a new version")
    ap.add_argument("--target", choices=P.TARGETS, default="e2e_ms")
    ap.add_argument("--stored-only", action="store_true", help="use only variants already measured")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    fit_vs = P.fit_variants(args.fit)
    held_vs = P.eval_variants(args.eval, args.fit)
    fit = P.collect(fit_vs, args.device, log=log, measure=not args.stored_only, sessions=args.sessions)
    held = P.collect(held_vs, args.device, log=log, measure=not args.stored_only, sessions=args.sessions)
    by_target = {}
    for target in P.TARGETS:
        p = P.KernelLatencyPredictor(args.device, target=target).fit(fit)
        e = p.evaluate(held)
        by_target[target] = {"within_10": e.within_10, "rmse_ms": e.rmse_ms, "mape": e.mape,
                             "median_ape": e.median_ape, "calibration": list(p.calibration)}
        print(f"\n## target {target}\n{e.table()}")
    t0 = time.perf_counter()
    pred = P.KernelLatencyPredictor(args.device, target=args.target).fit(fit)
    fit_s = time.perf_counter() - t0
    ev = pred.evaluate(held)
    train_ev = pred.evaluate(fit)
    # noise floor from the stored samples: two independent estimates of the same binary (the fastest
    # of its first session and of its last)
    floor = P.accuracy([s["e2e_early_ms"] for s in held], [s["e2e_again_ms"] for s in held])

    # throughput from features: batched (screening), cold (every kernel new to the predictor)
    # and warm (kernels seen before, as in a search where candidates share layers), and one
    # network at a time (cold)
    nets = [s["kernels"] for s in held]

    def rate(fn, per_call: int, cold: bool) -> float:
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            if cold:
                pred.forget_kernels()
            fn()
            reps += 1
        return reps * per_call / (time.perf_counter() - t0)

    batched = rate(lambda: pred.predict_many(nets), len(nets), cold=True)
    batched_warm = rate(lambda: pred.predict_many(nets), len(nets), cold=False)
    it = iter(range(10 ** 9))
    single = rate(lambda: pred.predict_features(nets[next(it) % len(nets)]), 1, cold=True)
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
            first.append(s["e2e_ms"])
            fresh = P.remeasure(json.loads(json.dumps(s, default=lambda o: None)), args.device)
            again.append(fresh["e2e_again_ms"])  # this session alone
            log(f"remeasure {s['key']}: {first[-1]:.3f} -> {again[-1]:.3f} ms")
        noise = P.accuracy(first, again, [s["key"] for s in held[:args.remeasure]])

    results = {
        "device": args.device, "tuning_state": P.TUNING_STATE, "fit_networks": len(fit),
        "held_out_networks": len(held), "kernel_samples": pred.info["n_kernel_samples"],
        "within_10": ev.within_10, "rmse_ms": ev.rmse_ms, "mape": ev.mape, "median_ape": ev.median_ape,
        "train_within_10": train_ev.within_10, "train_mape": train_ev.mape,
        "measured_ms_range": [min(s["e2e_ms"] for s in held), max(s["e2e_ms"] for s in held)],
        "fit_s": fit_s, "predictions_per_s_batched": batched, "predictions_per_s_batched_warm": batched_warm,
        "predictions_per_s_single": single,
        "predict_from_module_s": statistics.median(model_s) if model_s else None,
        "calibration": pred.calibration,
        "remeasure_within_10": noise.within_10 if noise else None,
        "remeasure_mape": noise.mape if noise else None, "remeasure_n": noise.n if noise else 0,
        "target": args.target, "by_target": by_target,
        "noise_floor_within_10": floor.within_10, "noise_floor_mape": floor.mape,
        "rows": [list(r) for r in ev.rows],
    }
    if args.save:
        path = pred.save(extra={"eval": {k: v for k, v in results.items() if k != "rows"}})
        results["saved"] = str(path)
    print("\n" + " | ".join(f"{t}: within 10% {100 * v['within_10']:.1f}%, RMSE {v['rmse_ms']:.3f} ms, "
                            f"mean |err| {100 * v['mape']:.1f}%" for t, v in by_target.items()))
    print(f"noise floor: two independent estimates of the same binary agree within +-10% for "
          f"{100 * floor.within_10:.1f}% of held-out networks (mean |diff| {100 * floor.mape:.1f}%)")
    print(f"\ntarget {args.target}: fit on {len(fit)} networks ({pred.info['n_kernel_samples']} kernels) in {fit_s:.1f} s; "
          f"held-out {len(held)}: within +-10% {100 * ev.within_10:.1f}%, RMSE {ev.rmse_ms:.3f} ms, "
          f"mean |err| {100 * ev.mape:.1f}%, median |err| {100 * ev.median_ape:.1f}% "
          f"(train: within 10% {100 * train_ev.within_10:.1f}%)")
    print(f"predictions/s from features: {batched:.0f} batched (cold), {batched_warm:.0f} batched (kernels "
          f"seen before), {single:.0f} one at a time (cold); "
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
