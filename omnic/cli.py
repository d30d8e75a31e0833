"""The ``omnic`` command line.

Core commands live here; other modules add theirs through ``register_cli(subparsers)``
(see ``_PLUGINS``), so each feature keeps its CLI next to its code.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable

from omnic.errors import OmnicError

_PLUGINS = ("omnic.rpc", "omnic.oracle.predictor", "omnic.passes.adapt", "omnic.search.cli",
            "omnic.demo", "omnic.tuning")


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise OmnicError(f"--input-shape must look like 1,3,224,224, got {text!r}") from None


def load_model_spec(spec: str, input_shape: tuple[int, ...] | None):
    """``module:factory`` (a callable returning an nn.Module), a zoo name, or an ``.onnx`` path.

    Returns:
        ``(model, example_inputs)``; ``example_inputs`` is None for ONNX files with static shapes.
    """
    import torch

    if spec.endswith(".onnx"):
        return spec, (torch.randn(*input_shape) if input_shape else None)
    from omnic import zoo

    if spec in zoo.ZOO:
        model, x = zoo.get_model(spec, input_shape=input_shape)
        return model, x
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise OmnicError(f"model {spec!r}: use module:factory, a zoo name ({', '.join(zoo.ZOO)}) or an .onnx path")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise OmnicError(f"cannot import {spec!r}: {exc}") from exc
    made = factory()
    if isinstance(made, tuple):
        model, x = made
        if input_shape:
            x = torch.randn(*input_shape)
        return model, x
    if input_shape is None:
        raise OmnicError(f"{spec} returned a model without example inputs: pass --input-shape, e.g. 1,3,224,224")
    return made.eval(), torch.randn(*input_shape)


def _deployment_from(args: argparse.Namespace):
    from omnic.deployment import Deployment

    fields: dict[str, Any] = {"device": args.device, "precision": args.precision}
    for name in ("threads", "tracker", "key"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "trials", None):
        fields["tuning_trials"] = args.trials
    return Deployment.coerce(fields)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="module:factory, a zoo name, or a path to an .onnx file")
    p.add_argument("--input-shape", help="e.g. 1,3,224,224")
    p.add_argument("--device", default="host")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--tracker", help="HOST:PORT of a TVM RPC tracker")
    p.add_argument("--key", help="RPC key of the device (default: the device table's)")
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule tuning trials (0: no tuning)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)


def cmd_devices(args: argparse.Namespace) -> int:
    if getattr(args, "tracker", None):
        from omnic import rpc

        return rpc.cli_devices(args)
    from omnic.targets import DEVICES

    rows = [d.summary() for d in DEVICES.values()]
    text = "\n".join([f"{'name':<18} {'kind':<4} {'precisions':<16} {'rpc key':<18} description"] + [
        f"{r['name']:<18} {r['kind']:<4} {','.join(r['precisions']):<16} {r['rpc_key']:<18} {r['description']}"
        for r in rows])
    _emit(args, rows, text)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from omnic import engine

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    dm = engine.compile(model, _deployment_from(args), x)
    out = dm.export(args.output) if args.output else None
    report = dict(dm.report, artifact=str(out) if out else None)
    text = (f"compiled for {report['device']} ({report['precision']}): {report['kernels_scheduled']} tuned, "
            f"{report['kernels_unscheduled']} untuned kernels; max rel error vs PyTorch "
            f"{report['max_rel_error']}" + (f"\nartifact: {out}" if out else ""))
    _emit(args, report, text)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from omnic import engine
    from omnic.oracle import default_oracle

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    deployment = _deployment_from(args)
    ms = engine.get_latency(model, deployment, x)
    m = default_oracle().lookup(model, deployment, x)
    data = {"device": deployment.device, "precision": deployment.precision, "latency_ms": ms,
            "spread": m.spread if m else None, "runs": m.runs if m else None}
    _emit(args, data, f"{deployment.device} {deployment.precision}: {ms:.4f} ms"
          + (f" (spread {100 * m.spread:.1f}% over {m.runs} repeats)" if m else ""))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from omnic import engine

    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    prof = engine.profile(model, _deployment_from(args), x)
    _emit(args, dict(prof), prof.table(top=args.top))
    return 0


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
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("latency", help="measured latency on a device")
    add_model_args(p)
    p.set_defaults(func=cmd_latency)
    p = sub.add_parser("profile", help="per-kernel latency, FLOPs, params, memory")
    add_model_args(p)
    p.add_argument("--top", type=int, default=15)
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
