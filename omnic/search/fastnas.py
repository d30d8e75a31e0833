"""FastNAS: prune a trained model to a measured latency budget without supernet training.

1. :func:`~omnic.search.channels.sort_channels` reorders every width group's channels by
   importance, so every narrower width keeps the most important channels.
2. :func:`fastnas_search` measures per-group sensitivity (score drop at each width, after BN
   recalibration on a few batches), checkpoints that map, then bisects on the allowed score
   drop (:class:`FastNASStrategy`): each step's configuration is exported and measured by the
   exact oracle, and the widest configuration measured within budget is returned.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

from omnic.core.cache import cache_root
from omnic.core.deployment import Deployment
from omnic.core.errors import SearchError
from omnic.core.measure import Oracle
from omnic.search.autonas import SearchConfig
from omnic.search.channels import channel_importance, sort_channels
from omnic.search.result import SearchResult, pareto_front
from omnic.search.searcher import Constraints, Searcher, weights_fingerprint
from omnic.search.space import Config
from omnic.search.strategy import Screen, Strategy
from omnic.search.train import recalibrate_bn

__all__ = ["FastNASConfig", "FastNASStrategy", "channel_importance", "config_for_drop", "fastnas_search",
           "sensitivity_map", "sort_channels"]


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


def sensitivity_map(space: Any, score: Callable[[Config], float], *, path: Path | None = None,
                    progress: bool = False) -> tuple[dict[str, Any], bool]:
    """``{"base": score, "drops": {choice: {width: drop}}}``, loaded from ``path`` when present.

    Args:
        space: The supernet's (width-only) space.
        score: Scores a configuration of ``space``.
        path: The map's checkpoint file.
        progress: Print one line per choice.

    Returns:
        The map and whether it was reused from the checkpoint.
    """
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
            return data, True
        except (OSError, json.JSONDecodeError):
            pass
    full = space.max()
    base = score(full)
    drops: dict[str, dict[str, float]] = {}
    for name, ch in space.choices.items():
        drops[name] = {str(ch.max): 0.0}
        for v in ch.values[:-1]:
            drops[name][str(v)] = base - score({**full, name: v})
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


def threshold_plan(space: Any, drops: Mapping[str, Mapping[str, float]]) -> list[dict[str, int]]:
    """The distinct configurations of every allowed score drop, widest first, ending narrowest."""
    thresholds = sorted({float(d) for g in drops.values() for d in g.values()} | {0.0})
    cfgs: list[dict[str, int]] = []
    for t in thresholds:
        c = config_for_drop(space, drops, t)
        if not cfgs or c != cfgs[-1]:
            cfgs.append(c)
    narrowest = space.min()
    if cfgs[-1] != narrowest:
        cfgs.append(narrowest)
    return cfgs


class FastNASStrategy(Strategy):
    """Bisection over the threshold plan: the narrowest configuration is the searcher's anchor,
    the widest is probed next, then each step halves the range between the widest known to fit
    (``hi``) and the narrowest known not to (``lo``)."""

    kind: ClassVar[str] = "fastnas"
    scores_measured: ClassVar[bool] = False  # every measured point is scored at the end
    config_type: ClassVar[type] = FastNASConfig

    def __init__(self, omni_model: Any, config: FastNASConfig = FastNASConfig()):
        if getattr(omni_model, "mode", None) != "fastnas":
            raise SearchError("fastnas search needs a supernet from nas.omnimize(model, mode='fastnas')")
        super().__init__(omni_model.space, omni_model.canonical)
        self.omni = omni_model
        self.config = config
        self.plan: list[dict[str, int]] = []
        self.lo = self.hi = self.steps = 0
        self.probed = False
        self.pending: str | None = None
        self.sensitivity: dict[str, Any] = {}
        self.sensitivity_reused = False
        self.sensitivity_s = 0.0
        self.sensitivity_path: Path | None = None

    @classmethod
    def from_config(cls, omni_model: Any, config: FastNASConfig) -> "FastNASStrategy":
        return cls(omni_model, config)

    @property
    def search_config(self) -> SearchConfig:
        return SearchConfig(max_measurements=self.config.max_steps + 2, generations=0,
                            calib_batches=self.config.calib_batches)

    def start(self, searcher: Any) -> None:
        t0 = time.perf_counter()
        fp = hashlib.sha256(json.dumps({"space": self.space.summary()["choices"],
                                        "weights": weights_fingerprint(self.omni),
                                        "calib": self.config.calib_batches}, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.config.checkpoint_dir) if self.config.checkpoint_dir else cache_root() / "fastnas"
        self.sensitivity_path = root / f"sensitivity-{fp}.json"
        self.sensitivity, self.sensitivity_reused = sensitivity_map(
            self.space, searcher.score, path=self.sensitivity_path, progress=searcher.progress)
        self.sensitivity_s = time.perf_counter() - t0
        self.plan = threshold_plan(self.space, self.sensitivity["drops"])
        self.lo, self.hi = 0, len(self.plan) - 1  # invariant: plan[hi] fits; everything before lo does not

    def finished(self, searcher: Any) -> bool:
        return self.probed and not (self.lo < self.hi and self.steps < self.config.max_steps)

    def ask(self, screen: Screen) -> list[Config]:
        if self.probed:
            index = (self.lo + self.hi) // 2
            self.steps += 1
        else:
            index = 0
        self.pending = index
        return [self.plan[index]]

    def tell(self, cfg: Mapping[str, Any], *, score: float | None = None, feasible: bool | None = None) -> None:
        # scores are not kept: the sensitivity map's candidates are never to be verified
        if feasible is None or self.pending is None or self.space.key(cfg) != self.space.key(self.plan[self.pending]):
            return
        if not self.probed:
            self.probed = True
            if feasible:
                self.hi = 0
            else:
                self.lo = 1
        elif feasible:
            self.hi = self.pending
        else:
            self.lo = self.pending + 1
        self.pending = None

    def best(self, searcher: Any) -> dict[str, Any]:
        cfg = self.plan[self.hi]
        return {"config": cfg, "latency_ms": float(searcher.measured[self.space.key(cfg)] or 0.0), "score": None}

    def export(self, searcher: Any, best: Mapping[str, Any]) -> tuple[Any, float]:
        # the pruned model is recalibrated as exported (no supernet statistics to restore)
        model = self.omni.export(best["config"])
        if searcher.calib_loader is not None and self.config.calib_batches > 0:
            recalibrate_bn(model, searcher.calib_loader, self.config.calib_batches)
        model.eval()
        return model, float(searcher.score_fn(model))

    def finish(self, searcher: Any, result: SearchResult) -> SearchResult:
        best_key = self.space.key(result.config)
        for p in result.points:
            p["score"] = result.score if self.space.key(p["config"]) == best_key else searcher.score(p["config"])
        result.pareto = pareto_front(result.points)
        result.history = [{"step": i, "config": json.loads(k), "latency_ms": v}
                          for i, (k, v) in enumerate(searcher.measured.items())]
        result.scores = {"full": self.sensitivity["base"], "pruned": result.score}
        result.info.update({"sensitivity_reused": self.sensitivity_reused,
                            "sensitivity_s": round(self.sensitivity_s, 3), "threshold_steps": len(self.plan),
                            "sensitivity_path": str(self.sensitivity_path)})
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "steps": self.steps, "probed": self.probed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lo, self.hi, self.steps, self.probed = state["lo"], state["hi"], state["steps"], state["probed"]


def fastnas_search(omni: Any, constraints: Any, deployment: Any, score_fn: Callable[[Any], float], *,
                   oracle: Oracle, config: FastNASConfig = FastNASConfig(),
                   calib_loader: Iterable | None = None, progress: bool = False) -> SearchResult:
    """Prune ``omni`` (from ``omnimize(mode="fastnas")``) to the budget; see the module docstring.

    Raises:
        InfeasibleConstraintError: Even the narrowest configuration measures over budget (carries
            its latency).
    """
    strategy = FastNASStrategy(omni, config)
    return Searcher(omni, Constraints.coerce(constraints), Deployment.coerce(deployment), score_fn, oracle,
                    strategy=strategy, calib_loader=calib_loader, progress=progress).run()
