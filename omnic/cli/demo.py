"""``omnic demo``: the main job end to end on this machine, with a report folder.

    omnic demo                    # defaults fit a 2-core machine in a few minutes
    omnic demo --trials 200       # tune the kernels first (MetaSchedule)
    omnic demo --quick            # tiny budgets: every step, little time

The work itself is :func:`omnic.examples.demo.run_demo`; this module only turns flags into a
:class:`~omnic.examples.demo.DemoConfig`, so the library never depends on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from omnic.examples.demo import QUICK, DemoConfig, run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out_dir=args.out, tuning_trials=args.trials, threads=args.threads)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    run_demo(cfg)
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="the main job end to end on this machine, with a report folder")
    p.add_argument("--out", default="omnic-report")
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (0: untuned kernels)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true", help="tiny budgets (for tests)")
    p.set_defaults(func=cmd_demo)
