"""The NAS frontend: adapt a model to a device, make it elastic, search it under a latency budget.

    adapted = nas.adapt(model, deployment, example_inputs)
    omni_model = nas.omnimize(model, mode="autonas", example_inputs=x)
    result = nas.search(omni_model, constraints={"latency": 3.0}, deployment=d, score_fn=validate)
"""
from __future__ import annotations

from typing import Any


def adapt(model: Any, deployment: Any = None, example_inputs: Any = None, **kwargs: Any):
    """Rewrite ``model`` with the adaptation passes that measurably help on the device.

    See :func:`omnic.passes.adapt.adapt` for the arguments.
    """
    from omnic.passes.adapt import adapt as _adapt

    return _adapt(model, deployment, example_inputs, **kwargs)


def omnimize(model: Any, mode: str = "autonas", example_inputs: Any = None, **kwargs: Any):
    """Convert ``model`` into an elastic supernet (still an ``nn.Module``).

    See :func:`omnic.search.api.omnimize`.
    """
    from omnic.search.api import omnimize as _omnimize

    return _omnimize(model, mode=mode, example_inputs=example_inputs, **kwargs)


def search(omni_model: Any, constraints: Any, deployment: Any = None, score_fn: Any = None, *,
           oracle: Any = None, **kwargs: Any):
    """Find the best subnet that meets ``constraints`` on the deployment's device.

    See :func:`omnic.search.api.search`; ``oracle`` defaults to :func:`omnic.oracle.default_oracle`.
    """
    from omnic.oracle import default_oracle
    from omnic.search.api import search as _search

    return _search(omni_model, constraints, deployment=deployment, score_fn=score_fn,
                   oracle=default_oracle() if oracle is None else oracle, **kwargs)


def train_supernet(*args: Any, **kwargs: Any):
    """Sandwich-rule supernet training; see :func:`omnic.search.train.train_supernet`."""
    from omnic.search.train import train_supernet as _train

    return _train(*args, **kwargs)


def finetune(*args: Any, **kwargs: Any):
    """Fine-tune a pruned subnet; see :func:`omnic.search.train.finetune`."""
    from omnic.search.train import finetune as _finetune

    return _finetune(*args, **kwargs)
