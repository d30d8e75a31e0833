"""The ``omnic`` command line.

Core commands live here; other modules add theirs through ``register_cli(subparsers)``
(see ``_PLUGINS``), so each feature keeps its CLI next to its code.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from omnic.cli.common import add_model_args, deployment_from, emit, load_model_spec, parse_shape
from omnic.core.errors import OmnicError

# One module per command family; each has register_cli(subparsers). Keep one name per line.
_PLUGINS = (
    "omnic.cli.remote",
    "omnic.cli.predictor",
    "omnic.cli.adapt",
    "omnic.cli.search",
    "omnic.cli.demo",
    "omnic.cli.tune",
)


def cmd_devices(args: argparse.Namespace) -> int:
    if getattr(args, "tracker", None):
        from omnic.cli.remote import cli_devices

        return cli_devices(args)
    from omnic.compile.target import device_summary
    from omnic.core.targets import DEVICES

    rows = [device_summary(d) for d in DEVICES.values()]
    text = "\n".join([f"{'name':<18} {'kind':<4} {'precisions':<16} {'rpc key':<18} description"] + [
        f"{r['name']:<18} {r['kind']:<4} {','.join(r['precisions']):<16} {r['rpc_key']:<18} {r['description']}"
        for r in rows])
    emit(args, rows, text)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from omnic import engine

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    dm = engine.compile(model, deployment_from(args), x, check=not args.no_check)
    out = dm.export(args.output) if args.output else None
    report = dict(dm.report, artifact=str(out) if out else None)
    text = (f"compiled for {report['device']} ({report['precision']}): {report['kernels_scheduled']} tuned, "
            f"{report['kernels_unscheduled']} untuned kernels; max rel error vs PyTorch "
            f"{'not checked' if report['max_rel_error'] is None else report['max_rel_error']}"
            + (f"\nartifact: {out}" if out else ""))
    emit(args, report, text)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from omnic import engine

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    deployment = deployment_from(args)
    ms = engine.get_latency(model, deployment, x, check=not args.no_check)
    m = engine.default_oracle().lookup(model, deployment, x)
    data = {"device": deployment.device, "precision": deployment.precision, "latency_ms": ms,
            "spread": m.spread if m else None, "runs": m.runs if m else None}
    emit(args, data, f"{deployment.device} {deployment.precision}: {ms:.4f} ms"
          + (f" (spread {100 * m.spread:.1f}% over {m.runs} repeats)" if m else ""))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from omnic import engine

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    prof = engine.profile(model, deployment_from(args), x, check=not args.no_check)
    emit(args, dict(prof), prof.table(top=args.top))
    return 0


def _add_no_check(p: argparse.ArgumentParser) -> None:
    # the check refuses (exit status 2, naming the op) a build whose outputs differ from PyTorch's
    p.add_argument("--no-check", action="store_true",
                   help="do not compare the compiled outputs with PyTorch (use a build that fails the check)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnic", description="Compile, measure and search PyTorch models "
                                     "for real hardware with Apache TVM.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("devices", help="the device table, or a tracker's queue with --tracker")
    p.add_argument("--tracker", help="HOST:PORT: show the tracker's keys and free/pending servers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("compile", help="compile a model for a device (and export it)")
    add_model_args(p)
    p.add_argument("-o", "--output", help="export the artifact to this folder")
    _add_no_check(p)
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("latency", help="measured latency on a device")
    add_model_args(p)
    _add_no_check(p)
    p.set_defaults(func=cmd_latency)
    p = sub.add_parser("profile", help="per-kernel latency, FLOPs, params, memory")
    add_model_args(p)
    p.add_argument("--top", type=int, default=15)
    _add_no_check(p)
    p.set_defaults(func=cmd_profile)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that feature is not in this build
            raise
        register: Callable | None = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OmnicError as exc:
        print(f"omnic: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
