"""How MetaSchedule searches: :class:`TuningConfig` and the :func:`using` stack that sets it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from omnic.core.errors import TuningError


@dataclass(frozen=True, kw_only=True)
class TuningConfig:
    """How MetaSchedule searches (the budget itself comes from the :class:`Deployment`).

    The defaults trade search depth for trials: a network's tasks share a short budget, so a
    cheaper search that measures more candidates reaches better kernels within it
    (``benchmarks/README.md`` has the measurements behind each default).

    Attributes:
        trials_per_iter: Candidates built and measured per batch.
        population_size: Evolutionary search population. MetaSchedule's default (512, with 4
            genetic iterations) spends much of each batch searching instead of measuring.
        genetic_num_iters: Genetic iterations per batch (default 4 in MetaSchedule).
        warmup_samples: Measured samples before XGBoost predictions are used (before that the
            search samples at random, without evolution). None: two batches, because
            MetaSchedule's fixed 100 spends the first minutes of a short run on random search.
        builder: ``"auto"`` (the default: ``"pool"`` for runs of at least ``pool_min_trials``
            trials, else ``"inproc"``), ``"inproc"`` (serial builds in this process: no worker
            start-up, best for small jobs), ``"pool"`` (a persistent process pool, parallel
            builds: builds are a large share of a batch, and one serial builder leaves a core
            idle) or ``"local"`` (MetaSchedule's LocalBuilder with ``fast_build``; a new pool
            per batch).
        pool_min_trials: With ``"auto"``, the smallest run that pays for starting the pool's
            workers (each imports TVM and torch, seconds).
        builder_workers: Processes of the ``"pool"``/``"local"`` builders.
        number: Runs per measurement of a candidate.
        min_repeat_ms: Minimum duration of one measurement (swamps timer noise on tiny kernels).
        cold_cache_repeats: N > 0 (default 10) measures N single runs of a candidate, each after
            evicting every argument but the first (the activation) from the CPU caches, as a
            kernel meets its weights and output buffer inside a network. 0 measures hot:
            ``number`` back-to-back runs of at least ``min_repeat_ms``. Hot measurements misled
            the search: kernels whose weights come from DRAM inside the network (a classifier's
            GEMV most of all) looked much faster in the runner than they ran in the graph.
        skip_prefixes: Task names that are not worth a trial (pure data movement with no loops to
            schedule). They stay untuned and are reported as skipped.
        seconds_per_trial: A low estimate of the cost of one trial, used to turn a time-only budget
            into a trial cap. It is kept below the fastest rate seen on any host, so that the
            deadline, not the cap, ends a time-budgeted run.
        cost_model: ``"xgb"`` (MetaSchedule's XGBoost model, retrained after every batch) or
            ``"random"`` (no model: saves the seconds of retraining per batch when the budget is
            so small that XGBoost never leaves its warm-up anyway).
        seed: Random seed of the search.
        time_defaults: CPU: judge tuned records against the default schedules: time each new
            task's default schedule before its first trial, and let ``engine.compile`` replay a
            record only where it beats the kernel's default schedule (see
            :mod:`omnic.compile.tuning.defaults`). False: records are used as they are.
    """

    trials_per_iter: int = 16
    population_size: int = 128
    genetic_num_iters: int = 1
    warmup_samples: int | None = None
    builder: str = "auto"
    builder_workers: int = 2
    pool_min_trials: int = 64
    number: int = 3
    min_repeat_ms: float = 40.0
    cold_cache_repeats: int = 10
    skip_prefixes: tuple[str, ...] = ("reshape",)
    seconds_per_trial: float = 0.1
    cost_model: str = "xgb"
    seed: int = 0
    time_defaults: bool = True

    def __post_init__(self) -> None:
        if self.builder not in ("auto", "inproc", "pool", "local"):
            raise TuningError(f"TuningConfig.builder must be 'auto', 'inproc', 'pool' or 'local', "
                              f"got {self.builder!r}")
        if self.cost_model not in ("xgb", "random"):
            raise TuningError(f"TuningConfig.cost_model must be 'xgb' or 'random', got {self.cost_model!r}")
        if self.trials_per_iter <= 0 or self.population_size <= 0 or self.genetic_num_iters < 0:
            raise TuningError("TuningConfig: trials_per_iter and population_size must be > 0, "
                              "genetic_num_iters >= 0")


def warmup_samples(config: TuningConfig) -> int:
    """Measured samples before the XGBoost model ranks candidates (random before that).

    Two batches: the model is shared by every task of the run and trained on relative
    throughput per workload, so a few dozen samples already rank candidates better than chance;
    MetaSchedule's 100 spent the first minutes of a short run on random search.
    """
    if config.warmup_samples is not None:
        return config.warmup_samples
    return 2 * config.trials_per_iter


_STACK: list[TuningConfig] = [TuningConfig()]


def current() -> TuningConfig:
    """The search settings in force: the innermost :func:`using` block's, else the defaults."""
    return _STACK[-1]


@contextlib.contextmanager
def using(config: TuningConfig) -> Iterator[TuningConfig]:
    """Make ``config`` the search settings of every compile inside the ``with`` block.

    ``engine.compile`` takes its budget from the deployment; this is how callers (tests, the
    benchmark) change *how* it searches without widening the engine's signature.
    """
    _STACK.append(config)
    try:
        yield config
    finally:
        _STACK.pop()
