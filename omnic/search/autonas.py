"""AutoNAS: the evolutionary strategy of a latency-constrained search over an :class:`OmniModel`.

Each generation the strategy is *asked* for a population of mutants and crossovers of the best
scored candidates so far; candidates are screened with the latency predictor (refitted to every
exact measurement) and the exact cost limits; the searcher scores them all and verifies the best
few with exact measurements (a candidate measured over budget is dropped and teaches the
predictor). The loop itself is :class:`~omnic.search.searcher.Searcher`'s.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

from omnic.core.errors import SearchError
from omnic.search.space import Config, SearchSpace
from omnic.search.strategy import Screen, Strategy, rng_state, set_rng_state


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


class EvolutionStrategy(Strategy):
    """Ask/tell evolutionary strategy (the oracle and scorer live outside it).

    ``ask(screen)`` proposes a population whose members pass ``screen(cfg)``; ``tell`` reports
    scores and, for verified candidates, measured feasibility.
    """

    kind: ClassVar[str] = "autonas"
    measure_first: ClassVar[bool] = False
    uses_predictor: ClassVar[bool] = True
    resumable: ClassVar[bool] = True
    config_type: ClassVar[type] = SearchConfig

    def __init__(self, space: SearchSpace, config: SearchConfig,
                 canonical: Callable[[Config], Config] | None = None):
        super().__init__(space, canonical)
        self.config = config
        self.rng = random.Random(config.seed)
        self.population: list[str] = []

    @classmethod
    def from_config(cls, omni_model: Any, config: SearchConfig) -> "EvolutionStrategy":
        return cls(omni_model.space, config, getattr(omni_model, "canonical", None))

    @property
    def search_config(self) -> SearchConfig:
        return self.config

    def _cfg(self, key: str) -> Config:
        return json.loads(key)

    def anchors(self) -> list[Config]:
        return [self.canonical(self.space.max())]

    def finished(self, searcher: Any) -> bool:
        return searcher.generation >= self.config.generations

    def parents(self, screen: Screen) -> list[str]:
        ranked = sorted((k for k in self.scores if k not in self.infeasible and screen(self._cfg(k))),
                        key=lambda k: -self.scores[k])
        return ranked[:self.config.parents]

    def _child(self, parents: list[str]) -> Config:
        c = self.config
        if not parents:
            return self.space.sample(self.rng)
        a = self._cfg(self.rng.choice(parents))
        if len(parents) >= 2 and self.rng.random() < c.crossover_prob:
            b = self._cfg(self.rng.choice(parents))
            child = {n: (a[n] if self.rng.random() < 0.5 else b[n]) for n in self.space.choices}
        else:
            child = dict(a)
        for n, ch in self.space.choices.items():
            if self.rng.random() < c.mutation_prob:
                child[n] = self.rng.choice(ch.values)
        return child

    def ask(self, screen: Screen) -> list[Config]:
        c = self.config
        parents = self.parents(screen)
        out: list[str] = list(parents)
        seen = set(out)
        for _ in range(c.screen_tries):
            if len(out) >= c.population:
                break
            child = self.canonical(self._child(parents))
            key = self.space.key(child)
            if key in seen or key in self.infeasible or not screen(child):
                continue
            seen.add(key)
            out.append(key)
        self.population = out
        return [self._cfg(k) for k in out]

    def record(self, searcher: Any, proposals: list[Config]) -> dict[str, Any]:
        best = searcher.best_verified()
        return {"generation": searcher.generation, "population": len(proposals), "scored": len(self.scores),
                "measured": len(searcher.measured),
                "best_verified_score": None if best is None else best["score"],
                "best_population_score": max((searcher.memo_scores[self.space.key(p)] for p in proposals),
                                             default=None),
                "predictor_mae_rel": searcher.predictor.mae_rel}

    def finish(self, searcher: Any, result: Any) -> Any:
        result.info["seed"] = self.config.seed
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), **super().state_dict(), "population": list(self.population)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(self.rng, state["rng"])
        super().load_state_dict(state)
        self.population = list(state["population"])
