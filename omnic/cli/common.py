"""What every ``omnic`` command shares: model specs, shapes, deployment flags and output."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from omnic.core.errors import OmnicError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape`` as a tuple (``"1,3,224,224"`` or ``"1x3x224x224"``), or None when not given.

    Raises:
        DeploymentError: Not a list of positive integers.
    """
    if not text:
        return None
    from omnic.core.deployment import parse_input_shape

    return parse_input_shape(text)


def load_model_spec(spec: str, input_shape: tuple[int, ...] | None):
    """``module:factory`` (a callable returning an nn.Module), a zoo name, or an ``.onnx`` path.

    Returns:
        ``(model, example_inputs)``; ``example_inputs`` is None for ONNX files with static shapes.
    """
    import torch

    if spec.endswith(".onnx"):
        return spec, (torch.randn(*input_shape) if input_shape else None)
    from omnic.examples import zoo

    if spec in zoo.ZOO:
        model, x = zoo.get_model(spec, input_shape=input_shape)
        return model, x
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise OmnicError(f"model {spec!r}: use module:factory, a zoo name ({', '.join(zoo.ZOO)}) or an .onnx path")
    # the `omnic` script's sys.path holds its own folder, not the working directory: put that
    # first, as `python -m` does, so `omnic latency mymod:factory` finds ./mymod.py
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
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


def deployment_from(args: argparse.Namespace):
    from omnic.core.deployment import Deployment

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


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)
