"""FastNAS: prune a trained model to a measured latency budget without supernet training.

1. :func:`sort_channels` reorders every width group's channels by importance (BatchNorm scale,
   or the producing layers' weight norms) consistently in every layer that touches them, so the
   full-width output is unchanged and every narrower width keeps the most important channels.
2. :func:`fastnas_search` measures per-group sensitivity (score drop at each width, after BN
   recalibration on a few batches), checkpoints that map, then bisects on the allowed score
   drop: each step's configuration is exported and measured by the exact oracle, and the widest
   configuration measured within budget is returned.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from omnic.core.deployment import Deployment
from omnic.core.errors import InfeasibleConstraintError, SearchError
from omnic.search.autonas import Constraints, OracleLike, _weights_fingerprint
from omnic.search.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from omnic.search.result import SearchResult, pareto_front


@dataclass(frozen=True, kw_only=True)
class FastNASConfig:
    """Settings of :func:`fastnas_search`.

    Attributes:
        calib_batches: BN recalibration batches before each sensitivity score (needs a loader).
        max_steps: Exact measurements the bisection may use (besides the first two probes).
        checkpoint_dir: Where the sensitivity map is kept (default: ``<cache root>/fastnas``).
    """

    calib_batches: int = 4
    max_steps: int = 10
    checkpoint_dir: str | None = None


# --------------------------------------------------------------------------- channel sorting
def channel_importance(omni_model: Any) -> dict[str, torch.Tensor]:
    """Per width choice, one importance value per channel (higher = keep)."""
    space = omni_model.space
    imp: dict[str, torch.Tensor] = {}
    from_bn: dict[str, bool] = {}

    def add(name: str, offset: int, size: int, values: torch.Tensor, is_bn: bool) -> None:
        values = values[offset:offset + size].detach().float()
        values = values / (values.max() + 1e-12)  # each layer gets an equal vote
        if is_bn and not from_bn.get(name):
            imp[name] = torch.zeros(size)
            from_bn[name] = True
        if is_bn or not from_bn.get(name):
            imp[name] = imp.get(name, torch.zeros(size)) + values

    for m in omni_model.elastic_modules().values():
        offset = 0
        for name, size in m.out_segments:
            if name in space.choices and space[name].kind == "width":
                if isinstance(m, ElasticBatchNorm2d) and m.affine:
                    add(name, offset, size, m.weight.abs(), True)
                elif isinstance(m, (ElasticConv2d, ElasticLinear)) and getattr(m, "groups", 1) == 1:
                    add(name, offset, size, m.weight.flatten(1).norm(dim=1), False)
            offset += size
    return imp


def _perm_for(segments, perms: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    parts, offset, any_perm = [], 0, False
    for name, size in segments:
        if name in perms:
            parts.append(perms[name] + offset)
            any_perm = True
        else:
            parts.append(torch.arange(offset, offset + size))
        offset += size
    return torch.cat(parts) if any_perm else None


@torch.no_grad()
def sort_channels(omni_model: Any) -> dict[str, list[int]]:
    """Reorder channels of every width group by importance, descending (outputs unchanged).

    Groups with grouped convs wider than one channel per group keep their order (a permutation
    across groups would change the function).

    Returns:
        The permutation applied per width choice.
    """
    groups = omni_model.groups
    perms = {name: torch.argsort(v, descending=True, stable=True)
             for name, v in channel_importance(omni_model).items()
             if groups.get(name, {}).get("granularity", 1) == 1}
    for m in omni_model.elastic_modules().values():
        out_p = _perm_for(m.out_segments, perms)
        in_p = _perm_for(m.in_segments, perms)
        if isinstance(m, ElasticBatchNorm2d):
            if out_p is None:
                continue
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[out_p])
        elif isinstance(m, (ElasticConv2d, ElasticLinear)):
            w = m.weight
            if out_p is not None:
                w.copy_(w[out_p])
                if m.bias is not None:
                    m.bias.copy_(m.bias[out_p])
            if in_p is not None and getattr(m, "groups", 1) == 1:
                w.copy_(w[:, in_p])
    return {k: v.tolist() for k, v in perms.items()}


# --------------------------------------------------------------------------- search
def _score(omni: Any, cfg: Mapping[str, Any], score_fn: Callable, loader: Iterable | None, batches: int) -> float:
    from omnic.search.train import preserved_bn_stats, recalibrate_bn

    with omni.active(cfg):
        if loader is not None and batches > 0:
            with preserved_bn_stats(omni):
                recalibrate_bn(omni, loader, batches)
                return float(score_fn(omni))
        omni.eval()
        return float(score_fn(omni))


def sensitivity_map(omni: Any, score_fn: Callable, *, calib_loader: Iterable | None, config: FastNASConfig,
                    path: Path | None = None, progress: bool = False) -> tuple[dict[str, Any], bool]:
    """``{"base": score, "drops": {choice: {width: drop}}}``, loaded from ``path`` when present.

    Returns:
        The map and whether it was reused from the checkpoint.
    """
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
            return data, True
        except (OSError, json.JSONDecodeError):
            pass
    space = omni.space
    full = space.max()
    base = _score(omni, full, score_fn, calib_loader, config.calib_batches)
    drops: dict[str, dict[str, float]] = {}
    for name, ch in space.choices.items():
        drops[name] = {str(ch.max): 0.0}
        for v in ch.values[:-1]:
            cfg = dict(full)
            cfg[name] = v
            drops[name][str(v)] = base - _score(omni, cfg, score_fn, calib_loader, config.calib_batches)
        if progress:
            print(f"[fastnas] sensitivity {name}: {drops[name]}", flush=True)
    data = {"base": base, "drops": drops}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    return data, False


def config_for_drop(space: Any, drops: Mapping[str, Mapping[str, float]], threshold: float) -> dict[str, int]:
    """Per group, the narrowest width whose score drop is at most ``threshold``."""
    cfg = {}
    for name, ch in space.choices.items():
        ok = [v for v in ch.values if drops[name].get(str(v), float("inf")) <= threshold]
        cfg[name] = min(ok) if ok else ch.max
    return cfg


def fastnas_search(omni: Any, constraints: Any, deployment: Any, score_fn: Callable[[Any], float], *,
                   oracle: OracleLike, config: FastNASConfig = FastNASConfig(),
                   calib_loader: Iterable | None = None, progress: bool = False) -> SearchResult:
    """Prune ``omni`` (from ``omnimize(mode="fastnas")``) to the budget; see the module docstring.

    Raises:
        InfeasibleConstraintError: Even the narrowest configuration measures over budget (carries
            its latency).
    """
    from omnic.core.cache import cache_root
    from omnic.search.train import recalibrate_bn

    from omnic.search.train import fixed_batches

    t0 = time.perf_counter()
    calib_loader = fixed_batches(calib_loader, config.calib_batches)
    if getattr(omni, "mode", None) != "fastnas":
        raise SearchError("fastnas search needs a supernet from nas.omnimize(model, mode='fastnas')")
    cons = Constraints.coerce(constraints)
    dep = Deployment.coerce(deployment)
    space = omni.space
    fp = hashlib.sha256(json.dumps({"space": space.summary()["choices"], "weights": _weights_fingerprint(omni),
                                    "calib": config.calib_batches}, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(config.checkpoint_dir) if config.checkpoint_dir else cache_root() / "fastnas"
    sens, reused = sensitivity_map(omni, score_fn, calib_loader=calib_loader, config=config,
                                   path=root / f"sensitivity-{fp}.json", progress=progress)
    t_sens = time.perf_counter() - t0
    drops = sens["drops"]
    thresholds = sorted({float(d) for g in drops.values() for d in g.values()} | {0.0})
    cfgs: list[dict[str, int]] = []
    for t in thresholds:  # distinct configurations, widest first
        c = config_for_drop(space, drops, t)
        if not cfgs or c != cfgs[-1]:
            cfgs.append(c)
    narrowest = space.min()
    if cfgs[-1] != narrowest:
        cfgs.append(narrowest)
    measured: dict[str, float | None] = {}
    scores: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    fresh = 0

    def measure(c: Mapping[str, Any]) -> float | None:
        nonlocal fresh
        key = space.key(c)
        if key not in measured:
            m = oracle.measure(omni.export(c).eval(), dep, omni.example_input(c))
            fresh += 0 if getattr(m, "cached", False) else 1
            measured[key] = float(m.median_ms) if m.ok else None
            history.append({"step": len(history), "config": dict(c), "latency_ms": measured[key]})
            if progress:
                print(f"[fastnas] measured {measured[key]} ms", flush=True)
        return measured[key]

    def fits(c: Mapping[str, Any]) -> bool:
        lat = measure(c) if cons.latency is not None else 0.0
        return lat is not None and (cons.latency is None or lat <= cons.latency) and cons.cost_ok(omni.cost(c))

    lo, hi = 0, len(cfgs) - 1  # invariant: cfgs[hi] fits; everything before lo does not
    if not fits(cfgs[hi]):
        lats = [v for v in measured.values() if v is not None]
        raise InfeasibleConstraintError(
            f"no pruned model meets {cons.to_dict()} on {dep.device}: the smallest latency measured is "
            f"{measured.get(space.key(cfgs[hi]))} ms (the narrowest widths); raise the budget or use a "
            "smaller base model",
            best_latency_ms=min(lats) if lats else None)
    if fits(cfgs[0]):
        hi = 0
    else:
        lo = 1
    steps = 0
    while lo < hi and steps < config.max_steps:
        mid = (lo + hi) // 2
        steps += 1
        if fits(cfgs[mid]):
            hi = mid
        else:
            lo = mid + 1
    best = cfgs[hi]
    model = omni.export(best)
    if calib_loader is not None and config.calib_batches > 0:
        recalibrate_bn(model, calib_loader, config.calib_batches)
    model.eval()
    score = float(score_fn(model))
    points = []
    for key, lat in measured.items():
        if lat is None:
            continue
        c = json.loads(key)
        if key not in scores:
            scores[key] = score if c == best else _score(omni, c, score_fn, calib_loader, config.calib_batches)
        points.append({"config": c, "latency_ms": lat, "score": scores[key],
                       "feasible": cons.latency is None or lat <= cons.latency})
    return SearchResult(model=model, config=best, latency_ms=float(measured[space.key(best)] or 0.0), score=score,
                        deployment=asdict(dep), constraints=cons.to_dict(), points=points,
                        pareto=pareto_front(points), history=history, measurements=len(measured),
                        wall_s=time.perf_counter() - t0, mode="fastnas", cost=omni.cost(best),
                        scores={"full": sens["base"], "pruned": score},
                        info={"sensitivity_reused": reused, "sensitivity_s": round(t_sens, 3),
                              "fresh_measurements": fresh, "threshold_steps": len(cfgs),
                              "sensitivity_path": str(root / f"sensitivity-{fp}.json")})
