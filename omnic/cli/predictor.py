"""``omnic predictor fit|eval|collect``: the kernel-level latency predictor per device."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from omnic.cli.common import deployment_from
from omnic.examples import variants

#: :data:`omnic.oracle.predictor.TARGETS`, spelled out so that building the parser imports no TVM
#: (a test checks the two agree).
TARGETS = ("e2e_ms", "e2e_min_ms", "kernel_sum_ms")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_fit(args: argparse.Namespace) -> int:
    from omnic.oracle import predictor as P  # lazy: it imports TVM, which `omnic --help` must not wait for

    deployment = deployment_from(args)
    samples = P.collect(variants.fit_variants(args.samples), deployment, log=_log, sessions=args.sessions)
    pred = P.KernelLatencyPredictor(deployment.device, target=args.target).fit(samples)
    path = pred.save()
    print(f"fitted {deployment.device} predictor v{pred.version} on {len(samples)} networks "
          f"({pred.info['n_kernel_samples']} kernel samples); saved {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from omnic.oracle import predictor as P  # lazy: it imports TVM, which `omnic --help` must not wait for

    deployment = deployment_from(args)
    pred = P.KernelLatencyPredictor.load(deployment.device, args.version)
    fit_n = len(pred.info.get("train", {}).get("variants", [])) or 200
    held = [v for v in variants.eval_variants(args.samples, fit_n)
            if v.key not in set(pred.info.get("train", {}).get("variants", []))]
    samples = P.collect(held, deployment, log=_log, measure=not args.stored_only, sessions=args.sessions)
    ev = pred.evaluate(samples)
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 0.5:
        pred.forget_kernels()  # cold: every kernel is new to the predictor, the worst case
        pred.predict_many([s["kernels"] for s in samples])
        reps += 1
    rate = reps * len(samples) / (time.perf_counter() - t0)
    data = dict(ev.to_dict(), device=deployment.device, version=pred.version, target=pred.target,
                predictions_per_s=rate)
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print(ev.table())
        print(f"predictor {deployment.device} v{pred.version} (target {pred.target}): "
              f"{rate:.0f} network predictions/s from features (cold)")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from omnic.oracle import predictor as P  # lazy: it imports TVM, which `omnic --help` must not wait for

    deployment = deployment_from(args)
    chosen = variants.fit_variants(args.samples) if args.set == "fit" else variants.eval_variants(args.samples, 200)
    samples = P.collect(chosen, deployment, log=_log, sessions=args.sessions)
    print(f"{len(samples)} samples for {deployment.device} in {P.samples_path(deployment.device)}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``omnic predictor fit|eval|collect``."""
    p = subparsers.add_parser("predictor", help="kernel-level latency predictor per device")
    sub = p.add_subparsers(dest="predictor_command", required=True)

    def common(q):
        q.add_argument("--device", default="host")
        q.add_argument("--precision", default="fp32")
        q.add_argument("--threads", type=int)
        q.add_argument("--sessions", type=int, default=2,
                       help="measurement sessions per network, minutes apart; each figure keeps its fastest")

    q = sub.add_parser("fit", help="measure zoo variants (untuned) and fit a new predictor version")
    common(q)
    q.add_argument("--samples", type=int, default=56, help="number of zoo variants to fit on")
    q.add_argument("--target", choices=TARGETS, default="e2e_ms",
                   help="what to predict: e2e_ms (default; the measured end-to-end latency, the fastest of the "
                        "oracle's measurements over the sessions), kernel_sum_ms (sum of in-graph kernel times) "
                        "or e2e_min_ms (fastest single repeat)")
    q.set_defaults(func=cmd_fit)
    q = sub.add_parser("eval", help="accuracy on held-out zoo variants (within +-10%%, RMSE)")
    common(q)
    q.add_argument("--samples", type=int, default=20, help="number of held-out variants")
    q.add_argument("--stored-only", action="store_true", help="evaluate only held-out variants already measured")
    q.add_argument("--version", type=int, help="predictor version (default: newest)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval)
    q = sub.add_parser("collect", help="only measure samples (fit or held-out set)")
    common(q)
    q.add_argument("--samples", type=int, default=48)
    q.add_argument("--set", choices=("fit", "eval"), default="fit")
    q.set_defaults(func=cmd_collect)
