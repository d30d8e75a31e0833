"""Random search: the baseline AutoNAS is compared with, at the same number of exact measurements.

It measures uniformly random subnets (the smallest first, as AutoNAS does) that are within the
exact cost limits, scores the feasible ones and returns the best.
"""
from __future__ import annotations

import random
from typing import Any, Callable, ClassVar, Iterable, Mapping

from omnic.core.deployment import Deployment
from omnic.core.measure import Oracle
from omnic.search.autonas import SearchConfig
from omnic.search.result import SearchResult
from omnic.search.searcher import Constraints, Searcher
from omnic.search.space import Config, SearchSpace
from omnic.search.strategy import Screen, Strategy, rng_state, set_rng_state


class RandomStrategy(Strategy):
    """Proposes one uniformly random, not yet measured subnet per round.

    Args:
        space: The supernet's space.
        measurements: Exact measurements allowed; at most ``50 * measurements`` samples are drawn.
        seed: Seeds the sampling.
        calib_batches: BN recalibration batches before scoring.
        canonical: The supernet's canonical form of a configuration.
    """

    kind: ClassVar[str] = "random"
    config_type: ClassVar[type] = SearchConfig

    def __init__(self, space: SearchSpace, *, measurements: int, seed: int = 0, calib_batches: int = 0,
                 canonical: Callable[[Config], Config] | None = None):
        super().__init__(space, canonical)
        self.max_tries = 50 * measurements
        self.tries = 0
        self.rng = random.Random(seed)
        self._config = SearchConfig(seed=seed, max_measurements=max(2, measurements), generations=0,
                                    calib_batches=calib_batches)

    @classmethod
    def from_config(cls, omni_model: Any, config: SearchConfig) -> "RandomStrategy":
        return cls(omni_model.space, measurements=config.max_measurements, seed=config.seed,
                   calib_batches=config.calib_batches, canonical=omni_model.canonical)

    @property
    def search_config(self) -> SearchConfig:
        return self._config

    def finished(self, searcher: Any) -> bool:
        return searcher.budget_left <= 0 or self.tries >= self.max_tries

    def ask(self, screen: Screen) -> list[Config]:
        while self.tries < self.max_tries:
            self.tries += 1
            cfg = self.canonical(self.space.sample(self.rng))
            if screen(cfg):
                return [cfg]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "tries": self.tries, **super().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(self.rng, state["rng"])
        self.tries = int(state["tries"])
        super().load_state_dict(state)


def random_search(omni_model: Any, constraints: Any, deployment: Any, score_fn: Callable[[Any], float], *,
                  oracle: Oracle, measurements: int, seed: int = 0, calib_loader: Iterable | None = None,
                  calib_batches: int = 0) -> SearchResult:
    """Baseline: measure ``measurements`` uniformly random subnets (the smallest first, as AutoNAS
    does), score the feasible ones, return the best. Same accounting of exact measurements.

    Raises:
        InfeasibleConstraintError: No subnet measured meets the constraints.
    """
    strategy = RandomStrategy(omni_model.space, measurements=measurements, seed=seed, calib_batches=calib_batches,
                              canonical=omni_model.canonical)
    return Searcher(omni_model, Constraints.coerce(constraints), Deployment.coerce(deployment), score_fn, oracle,
                    strategy=strategy, calib_loader=calib_loader).run()
