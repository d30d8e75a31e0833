"""``omnic search``: omnimize a model, (optionally) train it on digits, search under a latency budget.

    omnic search digits_resnet --latency 0.1 --device host --epochs 3 -o out/
    omnic search mypkg.models:make_net --input-shape 1,1,16,16 --mode fastnas --latency 0.2 -o out/

Scores are validation accuracy on scikit-learn's digits (resized to the model's input), so the
model must take ``(N, C, H, W)`` images and return 10 logits.
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_search(args: argparse.Namespace) -> int:
    import torch

    from omnic import nas
    from omnic.cli.common import deployment_from, load_model_spec, parse_shape
    from omnic.core.errors import OmnicError
    from omnic.examples.digits import DigitsCNN, DigitsResNet, accuracy_fn, digits_loaders, train_plain

    shape = parse_shape(args.input_shape)
    builtin = {"digits_resnet": DigitsResNet, "digits_cnn": DigitsCNN}
    if args.model in builtin:
        shape = shape or (1, 1, 8, 8)
        model, x = builtin[args.model](in_channels=shape[1]), torch.randn(*shape)
    else:
        model, x = load_model_spec(args.model, shape)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise OmnicError("omnic search needs a model taking (N, C, H, W) images (pass --input-shape)")
    deployment = deployment_from(args)
    train, val = digits_loaders(size=int(x.shape[-1]), channels=int(x.shape[1]), seed=args.seed)
    torch.manual_seed(args.seed)
    if args.mode == "fastnas":
        if args.epochs:
            train_plain(model, train, epochs=args.epochs)
        omni = nas.omnimize(model, mode="fastnas", example_inputs=x, deployment=deployment, divisor=args.divisor)
    else:
        omni = nas.omnimize(model, mode="autonas", example_inputs=x, deployment=deployment, divisor=args.divisor)
        if args.epochs:
            nas.train_supernet(omni, train, epochs=args.epochs)
    print(f"space: {omni.space.num_subnets} subnets, {len(omni.space)} choices")
    overrides: dict[str, Any] = {}
    if args.mode != "fastnas":
        overrides = {"population": args.population, "parents": max(1, min(4, args.population // 2)),
                     "generations": args.generations,
                     "max_measurements": args.measurements, "seed": args.seed, "calib_batches": 2}
    result = nas.search(omni, {"latency": args.latency}, deployment=deployment, score_fn=accuracy_fn(val),
                        mode=args.mode, calib_loader=train, checkpoint_dir=args.output, progress=True,
                        **overrides)
    if args.finetune:
        nas.finetune(result, train, epochs=args.finetune, score_fn=accuracy_fn(val))
    summary = {"config": result.config, "latency_ms": result.latency_ms, "score": result.score,
               "scores": result.scores, "measurements": result.measurements, "wall_s": round(result.wall_s, 2)}
    if args.output:
        paths = result.save(args.output)
        summary["saved"] = {k: str(v) for k, v in paths.items()}
    print(json.dumps(summary, indent=2))
    return 0


def register_cli(subparsers: Any) -> None:
    from omnic.cli.common import add_model_args

    p = subparsers.add_parser("search", help="NAS: find the most accurate subnet under a measured latency budget")
    add_model_args(p)
    p.add_argument("--latency", type=float, required=True, help="budget in ms on the device")
    p.add_argument("--mode", choices=("autonas", "fastnas", "random"), default="autonas")
    p.add_argument("--epochs", type=int, default=2, help="training epochs on digits before searching")
    p.add_argument("--finetune", type=int, default=0, help="fine-tuning epochs for the result")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--measurements", type=int, default=8, help="exact measurements allowed (autonas)")
    p.add_argument("--divisor", type=int, help="channel multiple (default: the device's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="folder for the JSON/PNG report, the model and checkpoints")
    p.set_defaults(func=cmd_search)
