"""Neural architecture search: elastic supernets (AutoNAS) and pruning to a budget (FastNAS).

Entry points are in :mod:`omnic.nas` (``omnimize``, ``search``, ``train_supernet``, ``finetune``).
"""
from omnic.search.autonas import Constraints, EvolutionStrategy, SearchConfig, Searcher, random_search
from omnic.search.convert import ConvertConfig, convert
from omnic.search.fastnas import FastNASConfig, fastnas_search, sort_channels
from omnic.search.result import MultiSearchResult, SearchResult, pareto_front, plot_pareto
from omnic.search.space import Choice, SearchSpace
from omnic.search.supernet import OmniModel
from omnic.search.train import SandwichConfig, finetune, recalibrate_bn, train_supernet

__all__ = ["Choice", "Constraints", "ConvertConfig", "EvolutionStrategy", "FastNASConfig", "MultiSearchResult",
           "OmniModel", "SandwichConfig", "SearchConfig", "SearchResult", "SearchSpace", "Searcher", "convert",
           "fastnas_search", "finetune", "pareto_front", "plot_pareto", "random_search", "recalibrate_bn",
           "sort_channels", "train_supernet"]
