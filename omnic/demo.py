"""`omnic demo`: the main job on this machine, end to end, with a report folder."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def run_demo(out_dir: str | Path = "omnic-report", *, model_name: str = "mobilenet_v2",
             input_shape: tuple[int, ...] | None = (1, 3, 224, 224), threads: int | None = None) -> dict[str, Any]:
    """Compile a zoo model for this machine, measure it, compare with PyTorch eager.

    Returns:
        The report dict (also written to ``out_dir/report.json`` and ``report.md``).
    """
    import torch

    from omnic import engine
    from omnic.zoo import get_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, x = get_model(model_name, input_shape=input_shape)
    deployment = {"device": "host", **({"threads": threads} if threads else {})}
    t0 = time.perf_counter()
    dm = engine.compile(model, deployment, x)
    compile_s = time.perf_counter() - t0
    measurement = dm.measure()
    torch.set_num_threads(threads or int(__import__("os").environ.get("TVM_NUM_THREADS", "1")))
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    eager_ms = sorted(times)[len(times) // 2]
    report = {"model": model_name, "input_shape": list(x.shape), "device": "host",
              "compile_s": round(compile_s, 2), "omnic_ms": measurement.median_ms,
              "omnic_spread": measurement.spread, "pytorch_eager_ms": eager_ms,
              "max_rel_error": dm.report["max_rel_error"], "tuning": dm.report["tuning"]}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = ["# omnic demo", "", f"model `{model_name}` {tuple(x.shape)} on host", "",
          "| | latency ms |", "|---|---|",
          f"| omnic (TVM) | {measurement.median_ms:.3f} (spread {100 * measurement.spread:.1f}%) |",
          f"| PyTorch eager | {eager_ms:.3f} |", "",
          f"max relative error vs PyTorch: {dm.report['max_rel_error']:.2e}; compile {compile_s:.1f} s"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nreport written to {out.resolve()}")
    return report


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="the main job on this machine, with a report folder")
    p.add_argument("--out", default="omnic-report")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=lambda a: (run_demo(a.out, model_name=a.model, threads=a.threads), 0)[1])
