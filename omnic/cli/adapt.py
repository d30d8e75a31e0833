"""``omnic adapt``: rewrite a model for a device and print what was kept, with measurements.

    omnic adapt conv_attention --input-shape 1,3,32,32 --exact-only
    omnic adapt mypkg.models:make_net --input-shape 1,3,64,64 --device S888-gpu --no-measure
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from omnic import nas
from omnic.cli.common import add_model_args, deployment_from, emit, load_model_spec, parse_shape
from omnic.passes import DEFAULT_PASSES


def register_cli(subparsers: Any) -> None:
    """Add ``omnic adapt MODEL --input-shape ... [--exact-only] [--approximate] [--json]``."""
    p = subparsers.add_parser("adapt", help="rewrite a model for a device; keep what measurably helps")
    add_model_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact-only", action="store_true", help="exact rewrites only; outputs unchanged")
    mode.add_argument("--approximate", action="store_true", help="also try approximating swaps")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="max relative output change of an approximate swap (default 0.05)")
    p.add_argument("--passes", help=f"comma-separated subset of: {', '.join(DEFAULT_PASSES)}")
    p.add_argument("--save", help="torch.save the adapted GraphModule to this path")
    p.add_argument("--no-measure", action="store_true",
                   help="propose rewrites without measuring (a device with no tracker attached)")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    passes = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    quiet = getattr(args, "json", False)
    adapted = nas.adapt(model, deployment_from(args), x, exact_only=args.exact_only,
                        approximate=args.approximate, tolerance=args.tolerance, passes=passes,
                        measure=not args.no_measure,
                        progress=None if quiet else (lambda msg: print(msg, file=sys.stderr)))
    report = adapted.adapt_report
    if args.save:
        torch.save(adapted, args.save)
    emit(args, report.to_dict(), report.table() + (f"\nsaved: {args.save}" if args.save else ""))
    return 0
