"""``nas.omnimize`` and ``nas.search``: the user-facing entry points of omnic.search."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from omnic.core.deployment import Deployment
from omnic.core.errors import SearchError
from omnic.core.measure import Oracle
from omnic.search.autonas import SearchConfig
from omnic.search.channels import sort_channels
from omnic.search.convert import ConvertConfig, convert
from omnic.search.fastnas import FastNASConfig
from omnic.search.options import refuse_unknown
from omnic.search.result import MultiSearchResult, SearchResult
from omnic.search.sampling import RandomStrategy  # noqa: F401  registers the "random" strategy
from omnic.search.searcher import Constraints, Searcher
from omnic.search.strategy import config_class, create
from omnic.search.supernet import OmniModel


def omnimize(model: nn.Module, mode: str = "autonas", example_inputs: Any = None, *,
             deployment: Any = None, divisor: int | None = None, **kwargs: Any) -> OmniModel:
    """Convert ``model`` into an elastic supernet (still an ``nn.Module``).

    Args:
        model: An fx-traceable CNN (it is copied, not modified).
        mode: ``"autonas"`` (elastic width, kernel, depth, optional resolution) or
            ``"fastnas"`` (fine-grained width only, channels sorted by importance).
        example_inputs: A tensor (or tuple) shaped like one input batch.
        deployment: When given, widths are multiples of its device's ``channel_multiple``.
        divisor: Explicit channel multiple (overrides the deployment's).
        **kwargs: Fields of :class:`~omnic.search.convert.ConvertConfig`: ``width_ratios``,
            ``kernel_sizes``, ``depth``, ``resolutions``, ``freeze`` (module name patterns) and
            ``choices`` (``{"layer2.0.conv1": {"width": [16, 32]}}``).

    Returns:
        The :class:`OmniModel`; ``omni_model.space`` summarises its choices.
    """
    if divisor is None:
        divisor = Deployment.coerce(deployment).spec.channel_multiple if deployment is not None else 8
    fields = {f.name for f in dataclasses.fields(ConvertConfig)}
    refuse_unknown("omnimize", kwargs, fields - {"mode", "divisor"} | {"deployment", "divisor"})
    for key in ("freeze", "width_ratios", "kernel_sizes", "resolutions"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = (kwargs[key],) if isinstance(kwargs[key], (str, int, float)) else tuple(kwargs[key])
    config = ConvertConfig(mode=mode, divisor=int(divisor), **kwargs)
    omni = convert(model, example_inputs, config)
    if mode == "fastnas":
        omni.channel_permutation = sort_channels(omni)
    return omni


#: Keyword arguments of :func:`search` itself (not config fields), for close-match suggestions.
_SEARCH_KEYWORDS = frozenset({"constraints", "deployment", "score_fn", "mode", "config", "oracle",
                              "calib_loader", "checkpoint_dir", "progress"})


def _deployments(deployment: Any) -> list[Deployment]:
    if deployment is None:
        return [Deployment.coerce("host")]
    if isinstance(deployment, (list, tuple)):
        if not deployment:
            raise SearchError("deployment list is empty")
        return [Deployment.coerce(d) for d in deployment]
    return [Deployment.coerce(deployment)]


def search(omni_model: OmniModel, constraints: Any, deployment: Any = None,
           score_fn: Callable[[nn.Module], float] | None = None, *, mode: str | None = None,
           config: SearchConfig | FastNASConfig | None = None, oracle: Oracle | None = None,
           calib_loader: Iterable | None = None, checkpoint_dir: str | Path | None = None,
           progress: bool | None = None, **overrides: Any) -> SearchResult | MultiSearchResult:
    """Find the best subnet that meets ``constraints`` on the deployment's device.

    Args:
        omni_model: From :func:`omnimize`.
        constraints: ``{"latency": ms, "params": n, "flops": n, "memory": MB}`` (any subset), or
            per device ``{"host": {...}, "S888": {...}}`` when several deployments are given.
        deployment: A deployment, or a list of them (one subnet per device).
        score_fn: ``score_fn(model) -> float``, higher is better; it receives the supernet with
            the candidate active (call it like any module).
        mode: ``"autonas"`` (evolution), ``"random"`` (baseline) or ``"fastnas"``; default from
            how the model was omnimized.
        config: :class:`SearchConfig` (autonas/random) or :class:`FastNASConfig`; keyword
            ``overrides`` replace its fields (``population=8, seed=1``...); a name that is not a
            field raises :class:`SearchError` naming the closest valid ones.
        oracle: The exact latency oracle (the facade :func:`omnic.nas.search` passes the default).
        calib_loader: Batches for BatchNorm recalibration of each candidate before scoring (its
            first ``calib_batches`` batches are used; pass an unshuffled loader for searches that
            reproduce and resume exactly).
        checkpoint_dir: Checkpoints go here; a search started again with the same arguments
            resumes where it stopped.
        progress: Show a progress bar on stderr (rounds, measurements, the best so far); the
            default None shows it when stderr is a terminal.

    Returns:
        A :class:`SearchResult`, or a :class:`MultiSearchResult` (by device) for several
        deployments.

    Raises:
        InfeasibleConstraintError: No subnet meets the constraints (carries the smallest latency).
        SearchError: Misconfiguration.
    """
    if not isinstance(omni_model, OmniModel):
        raise SearchError("search needs a supernet from nas.omnimize(model, ...)")
    if score_fn is None:
        raise SearchError("search needs a score_fn(model) -> float (higher is better), e.g. validation accuracy")
    if oracle is None:
        raise SearchError("search needs the latency oracle that measures candidates (omnic.nas.search "
                          "passes the default one)")
    mode = mode or ("fastnas" if omni_model.mode == "fastnas" else "autonas")
    settings = _settings(mode, config, overrides, checkpoint_dir)
    deps = _deployments(deployment)
    per_device = isinstance(constraints, Mapping) and constraints and \
        all(isinstance(v, Mapping) or k not in ("latency", "params", "flops", "memory")
            for k, v in constraints.items())
    results = MultiSearchResult()
    for dep in deps:
        cons_raw = constraints.get(dep.device) if per_device else constraints
        if cons_raw is None:
            raise SearchError(f"no constraints given for device {dep.device!r}")
        cons = Constraints.coerce(cons_raw)
        if mode == "fastnas" and cons.latency is None:
            raise SearchError("FastNAS needs a latency constraint (ms)")
        strategy = create(mode, omni_model, settings)
        ckpt = Path(checkpoint_dir) / f"{mode}-{dep.device}-{dep.precision}.json" \
            if checkpoint_dir and strategy.resumable else None
        res = Searcher(omni_model, cons, dep, score_fn, oracle, strategy=strategy, calib_loader=calib_loader,
                       checkpoint=ckpt, progress=progress).run()
        name = dep.device
        if name in results:  # the same device twice (e.g. two thread counts): keep both
            name = f"{dep.device}:{dep.precision}:threads={dep.threads}"
        results[name] = res
    return results if len(deps) > 1 else next(iter(results.values()))


def _settings(mode: str, config: Any, overrides: Mapping[str, Any], checkpoint_dir: str | Path | None) -> Any:
    """The strategy's settings: ``config`` when it is of the mode's class (else the defaults),
    with ``overrides`` (and FastNAS's sensitivity map kept in ``checkpoint_dir``)."""
    cls = config_class(mode)
    fields = {f.name for f in dataclasses.fields(cls)}
    # the search's own keywords are valid names too: a misspelled one lands in **overrides
    refuse_unknown(f"search (mode {mode!r})", overrides, fields | _SEARCH_KEYWORDS)
    cfg = dataclasses.replace(config if isinstance(config, cls) else cls(), **overrides)
    if cls is FastNASConfig and checkpoint_dir is not None:
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(checkpoint_dir))
    return cfg
