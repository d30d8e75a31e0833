"""The ask/tell interface every search strategy implements, and the ``create(kind)`` factory.

A strategy only decides *which* configurations to look at; the :class:`~omnic.search.searcher.Searcher`
owns everything else (the loop, exact measurements and scores with their memo tables, the
feasibility check, checkpoints and the result). Each round the searcher *asks* the strategy for
proposals and *tells* it every score and measured feasibility; a few class attributes say how the
searcher evaluates a round's proposals:

* ``measure_first = False`` (evolution): every proposal is scored, then the best few are
  verified with exact measurements;
* ``measure_first = True`` (random, FastNAS): every proposal is measured, and scored when
  ``scores_measured`` and it meets the constraints.
"""
from __future__ import annotations

import random
from typing import Any, Callable, ClassVar, Mapping

from omnic.core.errors import SearchError
from omnic.search.space import Config, SearchSpace


Screen = Callable[[Config], bool]


def rng_state(rng: random.Random) -> list[Any]:
    """``rng``'s state as JSON-able lists (for checkpoints)."""
    st = rng.getstate()
    return [st[0], list(st[1]), st[2]]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    """Restore a state saved by :func:`rng_state`."""
    rng.setstate((state[0], tuple(state[1]), state[2]))


class Strategy:
    """Base class of search strategies (one subclass per ``kind``; see :func:`create`).

    Attributes:
        kind: The search mode this strategy implements (also the result's ``mode``).
        measure_first: Measure every proposal (True) or score all and verify the best (False).
        scores_measured: With ``measure_first``, score each proposal that measures feasible.
        uses_predictor: Screen proposals with the latency predictor (else with the exact cost
            limits only), and refit it after every measurement.
        resumable: Whether a search with a checkpoint directory checkpoints and resumes.
        config_type: The settings class :func:`create` expects for this kind.
        scores: Every score told so far, by configuration key.
        infeasible: Keys of configurations measured over the constraints.
    """

    kind: ClassVar[str] = ""
    measure_first: ClassVar[bool] = True
    scores_measured: ClassVar[bool] = True
    uses_predictor: ClassVar[bool] = False
    resumable: ClassVar[bool] = False
    config_type: ClassVar[type] = object
    _registry: ClassVar[dict[str, type["Strategy"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Strategy._registry[cls.kind] = cls

    def __init__(self, space: SearchSpace, canonical: Callable[[Config], Config] | None = None):
        self.space = space
        self.canonical = canonical or (lambda c: dict(c))
        self.scores: dict[str, float] = {}
        self.infeasible: set[str] = set()

    @classmethod
    def from_config(cls, omni_model: Any, config: Any) -> "Strategy":
        """The strategy for ``omni_model`` with the settings ``config`` (its own config class)."""
        raise NotImplementedError

    @property
    def search_config(self) -> Any:
        """The :class:`~omnic.search.autonas.SearchConfig` the searcher runs this strategy with."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the ask/tell protocol
    def start(self, searcher: Any) -> None:
        """Called once before the anchors are measured (FastNAS builds its plan here)."""

    def anchors(self) -> list[Config]:
        """Configurations measured and scored right after the smallest subnet."""
        return []

    def finished(self, searcher: Any) -> bool:
        """Whether the search loop is over (checked before every round)."""
        raise NotImplementedError

    def ask(self, screen: Screen) -> list[Config]:
        """The next round's proposals; ``screen(cfg)`` says whether one may meet the constraints."""
        raise NotImplementedError

    def tell(self, cfg: Mapping[str, Any], *, score: float | None = None, feasible: bool | None = None) -> None:
        """Report a score and/or a measured feasibility of ``cfg``."""
        key = self.space.key(cfg)
        if score is not None:
            self.scores[key] = float(score)
        if feasible is False:
            self.infeasible.add(key)

    def record(self, searcher: Any, proposals: list[Config]) -> dict[str, Any] | None:
        """A history entry for the round just evaluated (None: nothing recorded)."""
        return None

    def best(self, searcher: Any) -> dict[str, Any] | None:
        """The point the search returns (default: the best-scoring feasible measured one)."""
        return searcher.best_verified()

    def export(self, searcher: Any, best: Mapping[str, Any]) -> tuple[Any, float]:
        """The returned subnet and its score (default: exported with the statistics it was scored with)."""
        return searcher.export_scored(best["config"]), best["score"]

    def finish(self, searcher: Any, result: Any) -> Any:
        """The final :class:`~omnic.search.result.SearchResult` (strategies add their facts)."""
        return result

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "infeasible": sorted(self.infeasible)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scores = dict(state["scores"])
        self.infeasible = set(state["infeasible"])


def _strategy_class(kind: str) -> type[Strategy]:
    if kind not in Strategy._registry:
        raise SearchError(f"unknown search mode {kind!r}; use 'autonas', 'random' or 'fastnas'")
    return Strategy._registry[kind]


def create(kind: str, omni_model: Any, config: Any) -> Strategy:
    """The strategy of search mode ``kind`` (``"autonas"``, ``"random"`` or ``"fastnas"``).

    Raises:
        SearchError: No strategy implements ``kind``.
    """
    return _strategy_class(kind).from_config(omni_model, config)


def config_class(kind: str) -> type:
    """The settings class of search mode ``kind`` (what ``config=`` and overrides fill in)."""
    return _strategy_class(kind).config_type
