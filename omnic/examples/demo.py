"""The main job end to end on this machine, with a report folder.

Trains a small residual CNN on the real ``digits`` images, measures its compiled latency and
profile, adapts it, runs FastNAS and AutoNAS for two latency budgets, compiles and measures every
result, compares each with PyTorch eager and ONNX Runtime, and writes Markdown, JSON and a Pareto
plot. A second run reuses the trained weights, the tuning database and the latency store, and
says so. The ``omnic demo`` command (``omnic/cli/demo.py``) only maps its flags onto
:class:`DemoConfig`; this module never imports the command line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Knobs of the demo (defaults fit a 2-core machine in well under 10 minutes).

    Attributes:
        out_dir: The report folder.
        image_size: Digits are resized to this many pixels per side (32: large enough that the
            latencies compared are the kernels' work, not per-call overhead).
        width: Base width of the residual CNN.
        epochs: Training epochs of the base model.
        lr: Peak SGD learning rate of the base model.
        budgets: Latency budgets as fractions of the base model's measured latency.
        supernet_epochs: Sandwich-rule epochs of the AutoNAS supernet.
        finetune_epochs: Fine-tuning epochs after FastNAS pruning.
        measurements: Exact oracle measurements each AutoNAS search may ask for.
        tuning_trials: MetaSchedule trials for the base and result models (0: no tuning; kernels
            get omnic's default schedules, or schedules transferred from the tuning database).
        threads: Threads for TVM, PyTorch and ONNX Runtime alike.
        seed: Seeds data split, training and search.
    """

    out_dir: str = "omnic-report"
    image_size: int = 32
    width: int = 16
    epochs: int = 6
    lr: float = 0.05
    budgets: tuple[float, ...] = (0.8, 0.6)
    supernet_epochs: int = 4
    finetune_epochs: int = 1
    measurements: int = 10
    tuning_trials: int = 0
    threads: int | None = None
    seed: int = 0


#: A tiny configuration: exercises every step of the pipeline in little time (tests, --quick).
QUICK: dict[str, Any] = {"image_size": 16, "width": 8, "epochs": 2, "supernet_epochs": 1, "finetune_epochs": 1,
                         "budgets": (0.7,), "measurements": 4}


class _Steps:
    """Progress: one line per step with elapsed time (tqdm bars come from tuning)."""

    def __init__(self, total: int, say: Callable[[str], None] = print):
        self.total, self.done, self.t0, self.say = total, 0, time.perf_counter(), say

    def __call__(self, text: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {text}")


def _eager_and_ort(model: Any, x: Any, threads: int) -> dict[str, float]:
    from omnic.examples.baselines import onnxruntime_ms, torch_eager_ms

    return {"pytorch_eager_ms": torch_eager_ms(model, x, threads, min_time_s=0.5, min_calls=20),
            "onnxruntime_ms": onnxruntime_ms(model, x, threads, min_time_s=0.5, min_calls=20)}


def _weights_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def run_demo(config: DemoConfig = DemoConfig(), *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole flow and write the report folder.

    Returns:
        The report (also in ``<out_dir>/report.json``).
    """
    import torch

    from omnic import engine, nas
    from omnic.core.cache import cache_root
    from omnic.core.deployment import Deployment
    from omnic.examples.digits import DigitsResNet, accuracy, digits_loaders, train_plain

    t_start = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or int(os.environ.get("TVM_NUM_THREADS", "1"))
    deployment = Deployment(device="host", threads=threads, tuning_trials=config.tuning_trials)
    oracle = engine.default_oracle()
    fresh_before = oracle.fresh_measurements
    store_before = len(oracle.store)
    step = _Steps(8, say)
    reused: list[str] = []
    torch.manual_seed(config.seed)

    # 1. data and the base model (trained weights are cached: a second run skips training)
    train_loader, val_loader = digits_loaders(size=config.image_size, seed=config.seed)
    x = next(iter(val_loader))[0][:1].contiguous()
    score = lambda m: accuracy(m, val_loader)  # noqa: E731
    weights_dir = cache_root() / "demo"
    weights_dir.mkdir(parents=True, exist_ok=True)
    base_key = _weights_key("base", config.image_size, config.width, config.epochs, config.lr, config.seed)
    base = DigitsResNet(width=config.width)
    base_path = weights_dir / f"base-{base_key}.pt"
    if base_path.exists():
        base.load_state_dict(torch.load(base_path))
        reused.append("trained base weights")
    else:
        train_plain(base, train_loader, epochs=config.epochs, lr=config.lr, seed=config.seed)
        torch.save(base.state_dict(), base_path)
    base.eval()
    base_acc = score(base)
    step(f"trained DigitsResNet(width={config.width}) on digits {config.image_size}x{config.image_size}: "
         f"val accuracy {100 * base_acc:.1f}%")

    # 2. compiled latency and profile
    base_dm = engine.compile(base, deployment, x)
    base_latency = base_dm.measure().median_ms
    if base_dm.report["tuning"].get("new_tasks", 0) == 0 and base_dm.report["tuning"].get("tasks", 0):
        reused.append("tuning database (no new tasks for the base model)")
    prof = engine.profile(base, deployment, x)
    (out / "profile.txt").write_text(prof.table(top=20) + "\n")
    step(f"compiled for host: {base_latency:.3f} ms measured (max rel err vs PyTorch "
         f"{base_dm.report['max_rel_error']:.1e}); profile -> profile.txt")

    # 3. adaptation (exact passes only: accuracy untouched)
    adapted = nas.adapt(base, deployment, x, exact_only=True)
    adapt_report = adapted.adapt_report
    step(f"adapted (exact passes): {adapt_report.original_ms:.3f} -> {adapt_report.final_ms:.3f} ms, kept "
         f"{', '.join(adapt_report.kept) or 'nothing'}; table -> adapt.txt")
    (out / "adapt.txt").write_text(adapt_report.table() + "\n")

    budgets = [round(base_latency * f, 4) for f in config.budgets]
    results: list[dict[str, Any]] = []
    all_points: list[dict[str, Any]] = []

    # 4. FastNAS on the trained model, two budgets
    for budget in budgets:
        omni = nas.omnimize(base, mode="fastnas", example_inputs=x, deployment=deployment)
        res = nas.search(omni, constraints={"latency": budget}, deployment=deployment, score_fn=score,
                         calib_loader=train_loader)
        if res.info.get("sensitivity_reused"):
            reused.append(f"FastNAS sensitivity map (budget {budget:.3f} ms)")
        nas.finetune(res, train_loader, epochs=config.finetune_epochs, score_fn=score)
        results.append({"method": "FastNAS", "budget_ms": budget, "result": res})
        all_points += [dict(p, method="FastNAS") for p in res.points]
    step(f"FastNAS: budgets {budgets} ms -> " + ", ".join(
        f"{r['result'].latency_ms:.3f} ms" for r in results if r["method"] == "FastNAS"))

    # 5. AutoNAS: supernet (sandwich rule, cached weights), then evolutionary search per budget
    omni = nas.omnimize(base, mode="autonas", example_inputs=x, deployment=deployment)
    super_key = _weights_key("supernet", base_key, config.supernet_epochs, omni.space.summary()
                             if hasattr(omni.space, "summary") else str(omni.space))
    super_path = weights_dir / f"supernet-{super_key}.pt"
    if super_path.exists():
        omni.load_state_dict(torch.load(super_path))
        reused.append("trained supernet weights")
    else:
        nas.train_supernet(omni, train_loader, epochs=config.supernet_epochs, seed=config.seed)
        torch.save(omni.state_dict(), super_path)
    step(f"supernet trained ({config.supernet_epochs} sandwich epochs)")
    for budget in budgets:
        res = nas.search(omni, constraints={"latency": budget}, deployment=deployment, score_fn=score,
                         calib_loader=train_loader, max_measurements=config.measurements, seed=config.seed,
                         calib_batches=2)
        results.append({"method": "AutoNAS", "budget_ms": budget, "result": res})
        all_points += [dict(p, method="AutoNAS") for p in res.points]
    step("AutoNAS: budgets {} ms -> {}".format(budgets, ", ".join(
        f"{r['result'].latency_ms:.3f} ms" for r in results if r["method"] == "AutoNAS")))

    # 6. compile and measure every result; compare with eager and ONNX Runtime
    rows = []
    base_cmp = _eager_and_ort(base, x, threads)
    rows.append({"model": "base", "method": "trained", "budget_ms": None, "accuracy": base_acc,
                 "omnic_ms": base_latency, **base_cmp, "max_rel_error": base_dm.report["max_rel_error"],
                 "params": sum(p.numel() for p in base.parameters())})
    for r in results:
        res = r["result"]
        model = res.model.eval()
        dm = engine.compile(model, deployment, x)
        measured = dm.measure().median_ms
        rows.append({"model": f"{r['method']} @ {r['budget_ms']:.3f} ms", "method": r["method"],
                     "budget_ms": r["budget_ms"], "accuracy": score(model), "omnic_ms": measured,
                     "search_measured_ms": res.latency_ms, **_eager_and_ort(model, x, threads),
                     "max_rel_error": dm.report["max_rel_error"],
                     "params": sum(p.numel() for p in model.parameters()), "config": res.config})
    step(f"compiled and measured {len(rows)} models against PyTorch eager and ONNX Runtime")

    # 7. report folder
    fresh = oracle.fresh_measurements - fresh_before
    report = {
        "config": dataclasses.asdict(config), "threads": threads, "base_latency_ms": base_latency,
        "budgets_ms": budgets, "rows": rows, "schedules": base_dm.report["schedules"],
        "adapt": adapt_report.to_dict(),
        "profile": {k: v for k, v in prof.items() if k != "kernels"},
        "oracle": {"fresh_measurements": fresh, "store_rows_before": store_before, "store_rows_after": len(oracle.store)},
        "reused": reused, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _plot(rows, all_points, out / "pareto.png")
    (out / "report.md").write_text(_markdown(report))
    step(f"report written: {out.resolve()}/report.md, report.json, pareto.png")
    say(_markdown(report))
    return report


def _plot(rows: list[dict[str, Any]], points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, colour in (("FastNAS", "tab:orange"), ("AutoNAS", "tab:blue")):
        pts = [p for p in points if p["method"] == method and p.get("score") is not None and p.get("latency_ms")]
        if pts:
            ax.scatter([p["latency_ms"] for p in pts], [100 * p["score"] for p in pts], s=14, alpha=0.35,
                       color=colour, label=f"{method} candidates (measured)")
    for row in rows:
        colour = {"trained": "black", "FastNAS": "tab:orange", "AutoNAS": "tab:blue"}[row["method"]]
        ax.scatter([row["omnic_ms"]], [100 * row["accuracy"]], s=70, marker="*", color=colour,
                   edgecolor="black", zorder=3)
        ax.annotate(row["model"], (row["omnic_ms"], 100 * row["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("measured latency on host (ms)")
    ax.set_ylabel("digits validation accuracy (%)")
    ax.set_title("omnic demo: accuracy vs compiled, measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict[str, Any]) -> str:
    counts = report.get("schedules", {})
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no kernels"
    budget = ("no tuning (`omnic demo --trials N` tunes)" if not report["config"]["tuning_trials"]
              else f"{report['config']['tuning_trials']} tuning trials")
    lines = ["# omnic demo report", "",
             f"Latencies are of the builds a user would ship, compiled and measured on this machine: {budget}; "
             f"the base model's kernels: {kinds}.", "",
             f"host, {report['threads']} threads; base latency {report['base_latency_ms']:.3f} ms; budgets "
             f"{report['budgets_ms']} ms; wall time {report['wall_s']} s", "",
             "| model | accuracy | omnic ms | PyTorch eager ms | ONNX Runtime ms | omnic/ORT | params | max rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f}% | {r['omnic_ms']:.3f} | {r['pytorch_eager_ms']:.3f} "
                     f"| {r['onnxruntime_ms']:.3f} | {r['omnic_ms'] / r['onnxruntime_ms']:.2f} | {r['params']} "
                     f"| {r['max_rel_error']:.1e} |")
    o = report["oracle"]
    lines += ["", f"latency oracle: {o['fresh_measurements']} fresh measurements; store {o['store_rows_before']} -> "
              f"{o['store_rows_after']} rows",
              "reused from earlier runs: " + (", ".join(report["reused"]) if report["reused"] else "nothing (cold cache)"),
              "", "![pareto](pareto.png)", ""]
    return "\n".join(lines)

