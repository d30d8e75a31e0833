"""The search loop shared by every strategy: one :class:`Searcher` per deployment.

The loop:

1. anchors: the smallest subnet is measured with the exact oracle (it tells at once whether the
   budget is feasible at all), then the strategy's own anchors (AutoNAS: the largest subnet);
2. each round the strategy is *asked* for proposals; the searcher scores and measures them (see
   :mod:`omnic.search.strategy` for the two orders) and *tells* the strategy every score and
   measured feasibility;
3. at the end the best scored candidates not yet measured are measured until the best
   measured-feasible one cannot be beaten: the returned subnet's latency is a measurement that
   meets the budget; no such subnet raises :class:`InfeasibleConstraintError`.

Checkpointing (resumable strategies) writes the committed state at every round boundary plus memo
tables of every score and measurement, so a killed search replays to where it stopped without
measuring or scoring again and ends with the result an uninterrupted run gives.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from omnic.core.deployment import Deployment
from omnic.core.errors import InfeasibleConstraintError, SearchError
from omnic.core.measure import Oracle
from omnic.search.autonas import EvolutionStrategy, SearchConfig
from omnic.search.options import progress_bar, short
from omnic.search.predictor import ArchLatencyModel
from omnic.search.result import SearchResult, pareto_front
from omnic.search.space import Config, SearchSpace
from omnic.search.strategy import Strategy
from omnic.search.train import fixed_batches, preserved_bn_stats, recalibrate_bn

_COST_KEYS = ("params", "flops", "memory")


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """Search constraints.

    :meth:`coerce` takes a dict of these (or a bare latency); a latency may also be written with
    its unit, ``"5ms"`` or ``"5 ms"`` (read as 5.0). Every limit must be a finite number > 0.

    Attributes:
        latency: Measured latency budget in ms on the deployment's device.
        params: Maximum parameter count.
        flops: Maximum FLOPs (2 x multiply-accumulates).
        memory: Maximum memory estimate in MB (fp32 weights + largest conv activations).
    """

    latency: float | None = None
    params: float | None = None
    flops: float | None = None
    memory: float | None = None

    @classmethod
    def coerce(cls, value: Any) -> "Constraints":
        if isinstance(value, Constraints):
            return value
        if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
            return cls(latency=_limit("latency", value))
        if not isinstance(value, Mapping):
            raise SearchError(f"constraints must be a dict like {{'latency': 3.0}}, got {type(value).__name__}")
        unknown = set(value) - {"latency", "params", "flops", "memory"}
        if unknown:
            raise SearchError(f"unknown constraints {sorted(unknown)}; use latency (ms), params, flops, memory (MB)")
        return cls(**{k: (None if v is None else _limit(k, v)) for k, v in value.items()})

    def cost_ok(self, cost: Mapping[str, float]) -> bool:
        return all(getattr(self, k) is None or cost[k] <= getattr(self, k) for k in _COST_KEYS)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _limit(name: str, value: Any) -> float:
    """One constraint as a finite positive float; ``"5ms"``/``"5 ms"`` for the latency (its only
    unit: reading "5s" as 5 ms would be a wrong answer, so other units are refused)."""
    number: Any = value
    if isinstance(value, str):
        text = value.strip().lower()
        if name == "latency" and text.endswith("ms"):
            text = text[:-2].strip()
        try:
            number = float(text)
        except ValueError:
            unit = " in ms, e.g. 5.0 or \"5ms\"" if name == "latency" else ", e.g. 1e6"
            raise SearchError(f"constraint {name}={value!r} is not a number: give it{unit}") from None
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise SearchError(f"constraint {name} must be a number, got {type(value).__name__} {value!r}")
    number = float(number)
    if not math.isfinite(number) or number <= 0:
        raise SearchError(f"constraint {name} must be a finite number > 0, got {value!r}; "
                          "leave the key out for no limit")
    return number


# ---------------------------------------------------------------------------------------- search
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of ``model``'s weights: a checkpoint of other weights must not be resumed."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            if t.is_floating_point():
                h.update(f"{float(t.double().sum()):.6e}|{float(t.double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


class Searcher:
    """Runs one latency-constrained search for one deployment with one strategy.

    Args:
        omni_model: The supernet.
        constraints: Budget(s).
        deployment: Where latency is measured.
        score_fn: ``score_fn(omni_model) -> float`` with the candidate active (higher is better).
        oracle: The exact latency oracle (``.measure(model, deployment, example_inputs)``).
        config: :class:`SearchConfig` (default: the strategy's ``search_config``).
        strategy: What to look at (default: an :class:`EvolutionStrategy` over ``config``).
        calib_loader: Batches for BN recalibration before scoring (with ``calib_batches``).
        checkpoint: JSON file to checkpoint to and resume from.
        progress: A progress bar on stderr (rounds, measurements, best); None: when stderr is a terminal.
    """

    def __init__(self, omni_model: Any, constraints: Constraints, deployment: Deployment,
                 score_fn: Callable[[Any], float], oracle: Oracle, config: SearchConfig | None = None, *,
                 strategy: Strategy | None = None, calib_loader: Iterable | None = None,
                 checkpoint: str | Path | None = None, progress: bool | None = None):
        if config is None and strategy is None:
            raise SearchError("a Searcher needs a SearchConfig or a strategy")
        self.omni = omni_model
        self.space: SearchSpace = omni_model.space
        self.constraints = constraints
        self.deployment = deployment
        self.score_fn = score_fn
        self.oracle = oracle
        self.config: SearchConfig = config if config is not None else strategy.search_config
        self.calib_loader = fixed_batches(calib_loader, self.config.calib_batches)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self._bar: Any = None  # the progress bar while run() runs
        self.strategy = strategy or EvolutionStrategy(self.space, self.config, getattr(omni_model, "canonical", None))
        self.predictor = ArchLatencyModel(self._features, self.config.predictor)
        self._cost_cache: dict[str, dict[str, float]] = {}
        self._feat_cache: dict[str, list[float]] = {}
        # committed state (rolled back to the last round boundary on resume)
        self.measured: dict[str, float | None] = {}
        self.history: list[dict[str, Any]] = []
        self.generation = 0
        # memo tables (never rolled back: they only spare repeated work)
        self.memo_scores: dict[str, float] = {}
        self.memo_latency: dict[str, float | None] = {}
        self.fresh_measurements = 0
        self.score_calls = 0
        self.fingerprint = self._fingerprint()
        self._committed: dict[str, Any] | None = None

    # ------------------------------------------------------------------ cheap facts of a config
    def cost(self, cfg: Mapping[str, Any]) -> dict[str, float]:
        key = self.space.key(cfg)
        if key not in self._cost_cache:
            self._cost_cache[key] = self.omni.cost(cfg)
        return self._cost_cache[key]

    def _features(self, cfg: Mapping[str, Any]) -> list[float]:
        key = self.space.key(cfg)
        if key not in self._feat_cache:
            c = self.cost(cfg)
            # logs: the predictor regresses log-latency, which scales roughly with log-FLOPs
            self._feat_cache[key] = [math.log1p(c["flops"]), math.log1p(c["params"]), math.log1p(c["memory"])] \
                + self.space.encode(cfg)
        return self._feat_cache[key]

    def predicted(self, cfg: Mapping[str, Any]) -> float:
        key = self.space.key(cfg)
        if key in self.measured and self.measured[key] is not None:
            return float(self.measured[key])
        return float(self.predictor.predict([cfg])[0])

    def feasible(self, cfg: Mapping[str, Any], latency: float | None) -> bool:
        """Whether ``cfg`` measured at ``latency`` meets every constraint."""
        budget = self.constraints.latency
        return latency is not None and (budget is None or latency <= budget) and \
            self.constraints.cost_ok(self.cost(cfg))

    def screen(self, cfg: Mapping[str, Any]) -> bool:
        """Whether ``cfg`` may meet the constraints: exact cost limits, then its measured or
        predicted latency."""
        if not self.constraints.cost_ok(self.cost(cfg)):
            return False
        budget = self.constraints.latency
        if budget is None:
            return True
        key = self.space.key(cfg)
        if key in self.measured:
            lat = self.measured[key]
            return lat is not None and lat <= budget
        p = self.predicted(cfg)
        return math.isnan(p) or p <= budget * (1 + self.config.latency_margin)

    def unmeasured_within_cost(self, cfg: Mapping[str, Any]) -> bool:
        """The screen of strategies without the predictor: not measured yet, within the cost limits."""
        return self.space.key(cfg) not in self.measured and self.constraints.cost_ok(self.cost(cfg))

    def export_scored(self, cfg: Mapping[str, Any]) -> torch.nn.Module:
        """Export ``cfg`` with the BatchNorm statistics it was scored with.

        Scoring recalibrates BN per subnet (and then restores the supernet's statistics); the
        returned model must carry the recalibrated ones, or its accuracy is not the score.
        """
        if self.calib_loader is None or self.config.calib_batches <= 0:
            return self.omni.export(cfg).eval()
        with self.omni.active(cfg), preserved_bn_stats(self.omni):
            recalibrate_bn(self.omni, self.calib_loader, self.config.calib_batches)
            return copy.deepcopy(self.omni.export(cfg)).eval()

    # ------------------------------------------------------------------ expensive facts
    def score(self, cfg: Mapping[str, Any]) -> float:
        """``score_fn`` of ``cfg`` (memoised), after BN recalibration when configured."""
        key = self.space.key(cfg)
        if key not in self.memo_scores:
            self.score_calls += 1
            with self.omni.active(cfg):
                if self.calib_loader is not None and self.config.calib_batches > 0:
                    with preserved_bn_stats(self.omni):
                        recalibrate_bn(self.omni, self.calib_loader, self.config.calib_batches)
                        value = float(self.score_fn(self.omni))
                else:
                    self.omni.eval()
                    value = float(self.score_fn(self.omni))
            self.memo_scores[key] = value
            self._save()
        self.strategy.tell(cfg, score=self.memo_scores[key])
        return self.memo_scores[key]

    def _record_measurement(self, cfg: Mapping[str, Any], m: Any) -> None:
        self.fresh_measurements += 0 if getattr(m, "cached", False) else 1
        lat = float(m.median_ms) if m.ok else None
        self.memo_latency[self.space.key(cfg)] = lat
        if self._bar is not None:
            self._bar.set_postfix_str(f"measured {len(self.memo_latency)}, last {lat} ms", refresh=True)

    def measure_batch(self, cfgs: list[Config]) -> None:
        """Measure several candidates at once where the oracle can (``measure_many``: in parallel
        over an RPC farm), then record them one by one as :meth:`measure` does."""
        todo = [c for c in cfgs if self.space.key(c) not in self.memo_latency]
        shapes = {tuple(tuple(t.shape) for t in self.omni.example_input(c)) for c in todo}
        many = getattr(self.oracle, "measure_many", None)
        if len(todo) > 1 and many is not None and len(shapes) == 1:
            models = [self.omni.export(c).eval() for c in todo]
            results = many(models, self.deployment, self.omni.example_input(todo[0]))
            for c, m in zip(todo, results):
                self._record_measurement(c, m)
            self._save()
        for c in cfgs:
            self.measure(c)

    def measure(self, cfg: Mapping[str, Any]) -> float | None:
        """The exact latency of ``cfg`` in ms (memoised; None when it failed to build or run)."""
        key = self.space.key(cfg)
        if key not in self.memo_latency:
            sub = self.omni.export(cfg).eval()
            self._record_measurement(cfg, self.oracle.measure(sub, self.deployment, self.omni.example_input(cfg)))
            self._save()
        lat = self.memo_latency[key]
        self.measured[key] = lat
        self.strategy.tell(cfg, feasible=self.feasible(cfg, lat))
        self._refit_predictor()
        return lat

    def _refit_predictor(self) -> None:
        if self.strategy.uses_predictor:
            pts = [(json.loads(k), v) for k, v in self.measured.items() if v is not None]
            self.predictor.fit([c for c, _ in pts], [v for _, v in pts])

    @property
    def budget_left(self) -> int:
        return self.config.max_measurements - len(self.measured)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> str:
        blob = json.dumps({"space": self.space.summary()["choices"], "constraints": self.constraints.to_dict(),
                           "config": asdict(self.config), "deployment": asdict(self.deployment),
                           "weights": weights_fingerprint(self.omni)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _commit(self) -> None:
        self._committed = {"generation": self.generation, "strategy": self.strategy.state_dict(),
                           "measured": dict(self.measured), "history": list(self.history)}
        self._save()

    def _save(self) -> None:
        if self.checkpoint is None or self._committed is None:
            return
        data = {"fingerprint": self.fingerprint, "committed": self._committed,
                "memo": {"scores": self.memo_scores, "latency": self.memo_latency}}
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.checkpoint)  # atomic: a kill never leaves half a checkpoint

    def _load(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        try:
            data = json.loads(self.checkpoint.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if data.get("fingerprint") != self.fingerprint:
            return False  # another model/space/config: start afresh
        self.memo_scores = {k: float(v) for k, v in data["memo"]["scores"].items()}
        self.memo_latency = dict(data["memo"]["latency"])
        c = data["committed"]
        self.generation = c["generation"]
        self.strategy.load_state_dict(c["strategy"])
        self.measured = dict(c["measured"])
        self.history = list(c["history"])
        self._refit_predictor()
        self._committed = c
        return True

    # ------------------------------------------------------------------ the loop
    def _infeasible(self) -> InfeasibleConstraintError:
        lats = [v for v in self.measured.values() if v is not None]
        best = min(lats) if lats else None
        budget = self.constraints.latency
        return InfeasibleConstraintError(
            f"no subnet meets latency <= {budget} ms on {self.deployment.device}: the smallest measured "
            f"latency is {best if best is None else round(best, 4)} ms (smallest subnet: "
            f"{self.measured.get(self.space.key(self.omni.canonical(self.space.min())))} ms); raise the budget, allow a smaller "
            "space (lower width ratios, smaller resolutions) or adapt the model to the device",
            best_latency_ms=best)

    def _measure_anchors(self) -> None:
        """The smallest subnet first (an infeasible budget stops here), then the strategy's anchors."""
        smallest = self.omni.canonical(self.space.min())
        if not self.constraints.cost_ok(self.cost(smallest)):
            raise InfeasibleConstraintError(
                f"even the smallest subnet exceeds the params/flops/memory limits "
                f"({self.cost(smallest)} vs {self.constraints.to_dict()})", best_latency_ms=None)
        lat = self.measure(smallest)
        budget = self.constraints.latency
        if budget is not None and (lat is None or lat > budget):
            raise self._infeasible()
        self.score(smallest)
        for cfg in self.strategy.anchors():
            self.measure(cfg)
            self.score(cfg)

    def _verify_best(self, proposals: list[Config]) -> None:
        """Score every proposal, then verify the best screened ones together (one batch, so an
        RPC farm measures them in parallel)."""
        for cfg in proposals:
            self.score(cfg)
        batch: list[Config] = []
        for key in sorted((self.space.key(p) for p in proposals), key=lambda k: -self.memo_scores[k]):
            if len(batch) >= min(self.config.verify_per_generation, self.budget_left):
                break
            if key in self.measured:
                continue
            cfg = json.loads(key)
            if self.screen(cfg):
                batch.append(cfg)
        self.measure_batch(batch)

    def _measure_each(self, proposals: list[Config]) -> None:
        for cfg in proposals:
            lat = self.measure(cfg)
            if self.strategy.scores_measured and self.feasible(cfg, lat):
                self.score(cfg)

    def _final_verification(self) -> None:
        """Measure the best scored candidates until none can beat the best verified one."""
        while self.budget_left > 0:
            best = self.best_verified()
            floor = best["score"] if best else float("-inf")
            pending = sorted((k for k, s in self.strategy.scores.items()
                              if k not in self.measured and s > floor and self.screen(json.loads(k))),
                             key=lambda k: -self.strategy.scores[k])
            if not pending:
                break
            self.measure(json.loads(pending[0]))

    def run(self) -> SearchResult:
        """Search; see the module docstring.

        Raises:
            InfeasibleConstraintError: No subnet meets the constraints.
        """
        t0 = time.perf_counter()
        resumed = self._load()
        if not resumed:
            self.generation = 0
            self._commit()
        self.strategy.start(self)
        total = self.config.generations if self.config.generations > 0 else None
        self._bar = progress_bar(self.progress, total=total, initial=self.generation,
                                 desc=f"search {self.strategy.kind} on {self.deployment.device}", unit="round")
        try:
            return self._loop(t0, resumed)
        finally:
            self._bar.close()
            self._bar = None

    def _loop(self, t0: float, resumed: bool) -> SearchResult:
        if self.generation == 0:
            self._measure_anchors()
        screen = self.screen if self.strategy.uses_predictor else self.unmeasured_within_cost
        while not self.strategy.finished(self):
            proposals = self.strategy.ask(screen)
            if self.strategy.measure_first:
                self._measure_each(proposals)
            else:
                self._verify_best(proposals)
            record = self.strategy.record(self, proposals)
            if record is not None:
                self.history.append(record)
                self._bar.set_postfix_str(short(record), refresh=False)
            self._bar.update(1)
            self.generation += 1
            self._commit()
        self._final_verification()
        self._commit()
        return self._result(t0, resumed)

    def _result(self, t0: float, resumed: bool) -> SearchResult:
        best = self.strategy.best(self)
        if best is None:
            raise self._infeasible()
        cfg = best["config"]
        model, score = self.strategy.export(self, best)
        points = self.points()
        result = SearchResult(model=model, config=cfg, latency_ms=best["latency_ms"],
                              score=score, deployment=asdict(self.deployment),
                              constraints=self.constraints.to_dict(), points=points, pareto=pareto_front(points),
                              history=list(self.history), measurements=len(self.measured),
                              wall_s=time.perf_counter() - t0, mode=self.strategy.kind, cost=self.cost(cfg),
                              info={"resumed": resumed, "fresh_measurements": self.fresh_measurements,
                                    "score_calls": self.score_calls})
        return self.strategy.finish(self, result)

    def points(self) -> list[dict[str, Any]]:
        """Every measured configuration with its latency, score and feasibility."""
        out = []
        for key, lat in self.measured.items():
            if lat is None:
                continue
            cfg = json.loads(key)
            out.append({"config": cfg, "latency_ms": lat, "score": self.memo_scores.get(key),
                        "feasible": self.feasible(cfg, lat)})
        return out

    def best_verified(self) -> dict[str, Any] | None:
        """The best-scoring point measured within the constraints (None: none yet)."""
        best = None
        for p in self.points():
            if p["feasible"] and p["score"] is not None and (best is None or p["score"] > best["score"]):
                best = p
        return best
