"""AutoNAS: latency-constrained evolutionary search over an :class:`OmniModel`.

The loop (one deployment):

1. anchors: the smallest and largest subnets are measured with the exact oracle (the smallest
   tells at once whether the budget is feasible at all);
2. each generation the strategy is *asked* for a population; candidates are screened with the
   latency predictor (refitted to every exact measurement so far) and the exact cost limits;
   their scores are *told* back;
3. the best-scoring screened candidates are verified with exact measurements (a few per
   generation); a candidate measured over budget is dropped and teaches the predictor;
4. at the end the best unverified candidates are measured until the best measured-feasible one
   cannot be beaten: the returned subnet's latency is a measurement that meets the budget.

Checkpointing writes the committed state at every generation boundary plus memo tables of every
score and measurement, so a killed search replays to where it stopped without measuring or
scoring again and ends with the result an uninterrupted run gives.
"""
from __future__ import annotations

import copy

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from omnic.core.deployment import Deployment
from omnic.core.errors import InfeasibleConstraintError, SearchError
from omnic.search.predictor import LatencyPredictor
from omnic.search.result import SearchResult, pareto_front
from omnic.search.space import Config, SearchSpace

_COST_KEYS = ("params", "flops", "memory")


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """Search constraints.

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
        if isinstance(value, (int, float)):
            return cls(latency=float(value))
        if not isinstance(value, Mapping):
            raise SearchError(f"constraints must be a dict like {{'latency': 3.0}}, got {type(value).__name__}")
        unknown = set(value) - {"latency", "params", "flops", "memory"}
        if unknown:
            raise SearchError(f"unknown constraints {sorted(unknown)}; use latency (ms), params, flops, memory (MB)")
        out = cls(**{k: (None if v is None else float(v)) for k, v in value.items()})
        for k, v in asdict(out).items():
            if v is not None and v <= 0:
                raise SearchError(f"constraint {k} must be positive, got {v}")
        return out

    def cost_ok(self, cost: Mapping[str, float]) -> bool:
        return all(getattr(self, k) is None or cost[k] <= getattr(self, k) for k in _COST_KEYS)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Settings of the evolutionary search (everything that changes its outcome).

    Attributes:
        population: Candidates per generation.
        parents: Best candidates kept as parents of the next generation.
        generations: Generations to run.
        mutation_prob: Probability of re-drawing each choice of a child.
        crossover_prob: Probability that a child is a crossover of two parents (else a mutant).
        seed: Seeds every random decision; with the latency store it reproduces a search.
        max_measurements: Exact oracle measurements the search may ask for (anchors included).
        verify_per_generation: Candidates verified exactly per generation.
        screen_tries: Samples drawn at most to fill a population with screened candidates.
        latency_margin: Candidates predicted up to ``budget * (1 + margin)`` pass screening.
        predictor: ``"ridge"`` or ``"xgboost"``.
        calib_batches: BatchNorm recalibration batches before scoring each candidate (needs a
            ``calib_loader``; 0 scores with the supernet's statistics).
    """

    population: int = 16
    parents: int = 4
    generations: int = 5
    mutation_prob: float = 0.25
    crossover_prob: float = 0.5
    seed: int = 0
    max_measurements: int = 12
    verify_per_generation: int = 2
    screen_tries: int = 400
    latency_margin: float = 0.0
    predictor: str = "ridge"
    calib_batches: int = 0

    def __post_init__(self) -> None:
        if self.population < 2 or self.parents < 1 or self.parents > self.population:
            raise SearchError("need population >= 2 and 1 <= parents <= population")
        if self.max_measurements < 2:
            raise SearchError("max_measurements must be >= 2 (the smallest and the largest subnet)")
        if not 0 <= self.mutation_prob <= 1 or not 0 <= self.crossover_prob <= 1:
            raise SearchError("mutation_prob and crossover_prob are probabilities in [0, 1]")


class OracleLike(Protocol):
    def measure(self, model: Any, deployment: Any, example_inputs: Any = None) -> Any: ...


# ------------------------------------------------------------------------------------ strategies
class EvolutionStrategy:
    """Ask/tell evolutionary strategy (the oracle and scorer live outside it).

    ``ask(screen)`` proposes a population whose members pass ``screen(cfg)``; ``tell`` reports
    scores and, for verified candidates, measured feasibility.
    """

    def __init__(self, space: SearchSpace, config: SearchConfig,
                 canonical: Callable[[Config], Config] | None = None):
        self.space = space
        self.canonical = canonical or (lambda c: dict(c))
        self.config = config
        self.rng = random.Random(config.seed)
        self.scores: dict[str, float] = {}
        self.infeasible: set[str] = set()
        self.population: list[str] = []

    def _cfg(self, key: str) -> Config:
        return json.loads(key)

    def parents(self, screen: Callable[[Config], bool]) -> list[str]:
        ranked = sorted((k for k in self.scores if k not in self.infeasible and screen(self._cfg(k))),
                        key=lambda k: -self.scores[k])
        return ranked[:self.config.parents]

    def ask(self, screen: Callable[[Config], bool]) -> list[Config]:
        c = self.config
        parents = self.parents(screen)
        out: list[str] = list(parents)
        seen = set(out)
        for _ in range(c.screen_tries):
            if len(out) >= c.population:
                break
            if len(parents) >= 1:
                a = self._cfg(self.rng.choice(parents))
                if len(parents) >= 2 and self.rng.random() < c.crossover_prob:
                    b = self._cfg(self.rng.choice(parents))
                    child = {n: (a[n] if self.rng.random() < 0.5 else b[n]) for n in self.space.choices}
                else:
                    child = dict(a)
                for n, ch in self.space.choices.items():
                    if self.rng.random() < c.mutation_prob:
                        child[n] = self.rng.choice(ch.values)
            else:
                child = self.space.sample(self.rng)
            child = self.canonical(child)
            key = self.space.key(child)
            if key in seen or key in self.infeasible or not screen(child):
                continue
            seen.add(key)
            out.append(key)
        self.population = out
        return [self._cfg(k) for k in out]

    def tell(self, cfg: Mapping[str, Any], *, score: float | None = None, feasible: bool | None = None) -> None:
        key = self.space.key(cfg)
        if score is not None:
            self.scores[key] = float(score)
        if feasible is False:
            self.infeasible.add(key)

    def state_dict(self) -> dict[str, Any]:
        st = self.rng.getstate()
        return {"rng": [st[0], list(st[1]), st[2]], "scores": dict(self.scores),
                "infeasible": sorted(self.infeasible), "population": list(self.population)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        r = state["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        self.scores = dict(state["scores"])
        self.infeasible = set(state["infeasible"])
        self.population = list(state["population"])


# ---------------------------------------------------------------------------------------- search
def _weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            if t.is_floating_point():
                h.update(f"{float(t.double().sum()):.6e}|{float(t.double().abs().sum()):.6e}".encode())
    return h.hexdigest()[:16]


class Searcher:
    """Runs one latency-constrained search for one deployment.

    Args:
        omni_model: The supernet.
        constraints: Budget(s).
        deployment: Where latency is measured.
        score_fn: ``score_fn(omni_model) -> float`` with the candidate active (higher is better).
        oracle: The exact latency oracle (``.measure(model, deployment, example_inputs)``).
        config: :class:`SearchConfig`.
        calib_loader: Batches for BN recalibration before scoring (with ``calib_batches``).
        checkpoint: JSON file to checkpoint to and resume from.
        progress: Print one line per generation.
    """

    def __init__(self, omni_model: Any, constraints: Constraints, deployment: Deployment,
                 score_fn: Callable[[Any], float], oracle: OracleLike, config: SearchConfig, *,
                 calib_loader: Iterable | None = None, checkpoint: str | Path | None = None,
                 progress: bool = False):
        self.omni = omni_model
        self.space: SearchSpace = omni_model.space
        self.constraints = constraints
        self.deployment = deployment
        self.score_fn = score_fn
        self.oracle = oracle
        self.config = config
        from omnic.search.train import fixed_batches

        self.calib_loader = fixed_batches(calib_loader, config.calib_batches)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.strategy = EvolutionStrategy(self.space, config, getattr(omni_model, "canonical", None))
        self.predictor = LatencyPredictor(self._features, config.predictor)
        self._cost_cache: dict[str, dict[str, float]] = {}
        self._feat_cache: dict[str, list[float]] = {}
        # committed state (rolled back to the last generation boundary on resume)
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

    def screen(self, cfg: Mapping[str, Any]) -> bool:
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

    def export_scored(self, cfg: Mapping[str, Any]) -> torch.nn.Module:
        """Export ``cfg`` with the BatchNorm statistics it was scored with.

        Scoring recalibrates BN per subnet (and then restores the supernet's statistics); the
        returned model must carry the recalibrated ones, or its accuracy is not the score.
        """
        if self.calib_loader is None or self.config.calib_batches <= 0:
            return self.omni.export(cfg).eval()
        from omnic.search.train import preserved_bn_stats, recalibrate_bn

        with self.omni.active(cfg), preserved_bn_stats(self.omni):
            recalibrate_bn(self.omni, self.calib_loader, self.config.calib_batches)
            return copy.deepcopy(self.omni.export(cfg)).eval()

    # ------------------------------------------------------------------ expensive facts
    def score(self, cfg: Mapping[str, Any]) -> float:
        key = self.space.key(cfg)
        if key not in self.memo_scores:
            from omnic.search.train import preserved_bn_stats, recalibrate_bn

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
                self.fresh_measurements += 0 if getattr(m, "cached", False) else 1
                self.memo_latency[self.space.key(c)] = float(m.median_ms) if m.ok else None
            self._save()
        for c in cfgs:
            self.measure(c)

    def measure(self, cfg: Mapping[str, Any]) -> float | None:
        key = self.space.key(cfg)
        if key not in self.memo_latency:
            sub = self.omni.export(cfg).eval()
            m = self.oracle.measure(sub, self.deployment, self.omni.example_input(cfg))
            self.fresh_measurements += 0 if getattr(m, "cached", False) else 1
            self.memo_latency[key] = float(m.median_ms) if m.ok else None
            self._save()
        lat = self.memo_latency[key]
        self.measured[key] = lat
        feasible = lat is not None and (self.constraints.latency is None or lat <= self.constraints.latency)
        self.strategy.tell(cfg, feasible=feasible)
        pts = [(json.loads(k), v) for k, v in self.measured.items() if v is not None]
        self.predictor.fit([c for c, _ in pts], [v for _, v in pts])
        return lat

    @property
    def budget_left(self) -> int:
        return self.config.max_measurements - len(self.measured)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> str:
        blob = json.dumps({"space": self.space.summary()["choices"], "constraints": self.constraints.to_dict(),
                           "config": asdict(self.config), "deployment": asdict(self.deployment),
                           "weights": _weights_fingerprint(self.omni)}, sort_keys=True, default=str)
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
        pts = [(json.loads(k), v) for k, v in self.measured.items() if v is not None]
        self.predictor.fit([p for p, _ in pts], [v for _, v in pts])
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

    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        resumed = self._load()
        c = self.config
        budget = self.constraints.latency
        if not resumed:
            self.generation = 0
            self._commit()
        if self.generation == 0:
            smallest = self.omni.canonical(self.space.min())
            if not self.constraints.cost_ok(self.cost(smallest)):
                raise InfeasibleConstraintError(
                    f"even the smallest subnet exceeds the params/flops/memory limits "
                    f"({self.cost(smallest)} vs {self.constraints.to_dict()})", best_latency_ms=None)
            lat = self.measure(smallest)
            self.score(smallest)
            if budget is not None and (lat is None or lat > budget):
                raise self._infeasible()
            self.measure(self.omni.canonical(self.space.max()))
            self.score(self.omni.canonical(self.space.max()))
        while self.generation < c.generations:
            pop = self.strategy.ask(self.screen)
            for cfg in pop:
                self.score(cfg)
            # the generation's best screened candidates are verified together (one batch, so an
            # RPC farm measures them in parallel)
            batch: list[Config] = []
            for key in sorted((self.space.key(p) for p in pop), key=lambda k: -self.memo_scores[k]):
                if len(batch) >= min(c.verify_per_generation, self.budget_left):
                    break
                if key in self.measured:
                    continue
                cfg = json.loads(key)
                if self.screen(cfg):
                    batch.append(cfg)
            self.measure_batch(batch)
            best = self._best_verified()
            self.history.append({"generation": self.generation, "population": len(pop),
                                 "scored": len(self.strategy.scores), "measured": len(self.measured),
                                 "best_verified_score": None if best is None else best["score"],
                                 "best_population_score": max((self.memo_scores[self.space.key(p)] for p in pop),
                                                              default=None),
                                 "predictor_mae_rel": self.predictor.mae_rel})
            if self.progress:
                print(f"[autonas] gen {self.generation}: {self.history[-1]}", flush=True)
            self.generation += 1
            self._commit()
        # final verification: measure the best screened candidates until none can beat the best
        while self.budget_left > 0:
            best = self._best_verified()
            floor = best["score"] if best else float("-inf")
            pending = sorted((k for k, s in self.strategy.scores.items()
                              if k not in self.measured and s > floor and self.screen(json.loads(k))),
                             key=lambda k: -self.strategy.scores[k])
            if not pending:
                break
            self.measure(json.loads(pending[0]))
        self._commit()
        best = self._best_verified()
        if best is None:
            raise self._infeasible()
        cfg = best["config"]
        model = self.export_scored(cfg)
        points = self.points()
        return SearchResult(model=model, config=cfg, latency_ms=best["latency_ms"], score=best["score"],
                            deployment=asdict(self.deployment), constraints=self.constraints.to_dict(),
                            points=points, pareto=pareto_front(points), history=list(self.history),
                            measurements=len(self.measured), wall_s=time.perf_counter() - t0, mode="autonas",
                            cost=self.cost(cfg),
                            info={"resumed": resumed, "fresh_measurements": self.fresh_measurements,
                                  "score_calls": self.score_calls, "seed": c.seed})

    def points(self) -> list[dict[str, Any]]:
        out = []
        for key, lat in self.measured.items():
            if lat is None:
                continue
            cfg = json.loads(key)
            feasible = self.constraints.latency is None or lat <= self.constraints.latency
            out.append({"config": cfg, "latency_ms": lat, "score": self.memo_scores.get(key),
                        "feasible": bool(feasible and self.constraints.cost_ok(self.cost(cfg)))})
        return out

    def _best_verified(self) -> dict[str, Any] | None:
        best = None
        for p in self.points():
            if p["feasible"] and p["score"] is not None and (best is None or p["score"] > best["score"]):
                best = p
        return best


def random_search(omni_model: Any, constraints: Any, deployment: Any, score_fn: Callable[[Any], float], *,
                  oracle: OracleLike, measurements: int, seed: int = 0, calib_loader: Iterable | None = None,
                  calib_batches: int = 0) -> SearchResult:
    """Baseline: measure ``measurements`` uniformly random subnets (the smallest first, as AutoNAS
    does), score the feasible ones, return the best. Same accounting of exact measurements."""
    cons = Constraints.coerce(constraints)
    cfg = SearchConfig(seed=seed, max_measurements=max(2, measurements), generations=0,
                       calib_batches=calib_batches)
    s = Searcher(omni_model, cons, Deployment.coerce(deployment), score_fn, oracle, cfg,
                 calib_loader=calib_loader)
    t0 = time.perf_counter()
    rng = random.Random(seed)
    s._commit()
    first = omni_model.canonical(omni_model.space.min())
    lat = s.measure(first)
    if cons.latency is not None and (lat is None or lat > cons.latency):
        raise s._infeasible()
    s.score(first)
    tries = 0
    while s.budget_left > 0 and tries < 50 * measurements:
        tries += 1
        c = omni_model.canonical(omni_model.space.sample(rng))
        if omni_model.space.key(c) in s.measured or not cons.cost_ok(s.cost(c)):
            continue
        lat = s.measure(c)
        if lat is not None and (cons.latency is None or lat <= cons.latency):
            s.score(c)
    best = s._best_verified()
    points = s.points()
    return SearchResult(model=s.export_scored(best["config"]), config=best["config"],
                        latency_ms=best["latency_ms"], score=best["score"], deployment=asdict(s.deployment),
                        constraints=cons.to_dict(), points=points, pareto=pareto_front(points),
                        measurements=len(s.measured), wall_s=time.perf_counter() - t0, mode="random",
                        cost=s.cost(best["config"]))
