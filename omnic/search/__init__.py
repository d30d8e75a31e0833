"""Neural architecture search: elastic supernets (AutoNAS) and pruning to a budget (FastNAS).

Entry points are in :mod:`omnic.nas` (``omnimize``, ``search``, ``train_supernet``, ``finetune``).
One :class:`Searcher` runs every search; the strategies (:class:`EvolutionStrategy`,
:class:`RandomStrategy`, :class:`FastNASStrategy`) plug into it through the ask/tell interface of
:class:`Strategy` and are made by :func:`create_strategy`.
"""
from omnic.search.autonas import EvolutionStrategy, SearchConfig
from omnic.search.channels import sort_channels
from omnic.search.convert import ConvertConfig, convert
from omnic.search.fastnas import FastNASConfig, FastNASStrategy, fastnas_search
from omnic.search.predictor import ArchLatencyModel
from omnic.search.result import MultiSearchResult, SearchResult, pareto_front, plot_pareto
from omnic.search.sampling import RandomStrategy, random_search
from omnic.search.searcher import Constraints, Searcher
from omnic.search.space import Choice, SearchSpace
from omnic.search.strategy import Strategy
from omnic.search.strategy import create as create_strategy
from omnic.search.supernet import OmniModel
from omnic.search.train import SandwichConfig, finetune, recalibrate_bn, train_supernet

__all__ = ["ArchLatencyModel", "Choice", "Constraints", "ConvertConfig", "EvolutionStrategy", "FastNASConfig",
           "FastNASStrategy", "MultiSearchResult", "OmniModel", "RandomStrategy", "SandwichConfig", "SearchConfig",
           "SearchResult", "SearchSpace", "Searcher", "Strategy", "convert", "create_strategy", "fastnas_search",
           "finetune", "pareto_front", "plot_pareto", "random_search", "recalibrate_bn", "sort_channels",
           "train_supernet"]
