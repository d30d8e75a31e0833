"""`Oracle.measure(graph, deployment)`: exact compiled latency, looked up before it is measured."""
from __future__ import annotations

import functools
from typing import Any

from omnic.cache import cache_root
from omnic.deployment import Deployment
from omnic.ir import TracedModel, trace
from omnic.measure import MeasureConfig, Measurement
from omnic.oracle.store import LatencyStore, StoreKey


class Oracle:
    """The exact latency oracle for all devices.

    Args:
        store: Where measurements are kept (default: ``<cache>/latency.sqlite``).
        config: The measurement protocol.
    """

    def __init__(self, store: LatencyStore | None = None, config: MeasureConfig | None = None):
        self.store = store or LatencyStore(cache_root() / "latency.sqlite")
        self.config = config or MeasureConfig()
        self.fresh_measurements = 0

    def key(self, traced: TracedModel, deployment: Deployment) -> StoreKey:
        context = f"threads={deployment.threads or 'default'};trials={deployment.tuning_trials}"
        if deployment.is_remote:
            context += f";key={deployment.rpc_key}"
        return StoreKey(device=deployment.device, precision=deployment.precision,
                        input_shape=StoreKey.shape_text(traced.input_shapes),
                        structural_hash=traced.structural_hash, context=context)

    def lookup(self, model: Any, deployment: Any, example_inputs: Any = None) -> Measurement | None:
        deployment = Deployment.coerce(deployment)
        traced = model if isinstance(model, TracedModel) else trace(model, example_inputs)
        return self.store.get(self.key(traced, deployment))

    def measure(self, model: Any, deployment: Any, example_inputs: Any = None, *,
                config: MeasureConfig | None = None) -> Measurement:
        """Exact latency of ``model`` on the deployment's device (a stored value when there is one).

        Failures come back as a Measurement with ``error`` set, not as exceptions, so a batch of
        candidates is never lost to one bad one.
        """
        from omnic import engine

        deployment = Deployment.coerce(deployment)
        traced = model if isinstance(model, TracedModel) else trace(model, example_inputs)
        key = self.key(traced, deployment)
        cached = self.store.get(key)
        if cached is not None and cached.ok:
            return cached
        try:
            dm = engine.compile(traced, deployment, check=False, progress=False)
            measurement = dm.measure(config or self.config)
        except Exception as exc:  # noqa: BLE001 - a failed candidate is data
            from omnic.errors import OmnicError

            if isinstance(exc, OmnicError) and type(exc).__name__ in ("DeviceUnreachableError",):
                raise
            measurement = Measurement(median_ms=None, error=f"{type(exc).__name__}: {exc}",
                                      device=deployment.device)
        self.store.put(key, measurement)
        self.fresh_measurements += 1
        return measurement


@functools.lru_cache(maxsize=None)
def _oracle_for(path: str) -> Oracle:
    return Oracle(LatencyStore(path))


def default_oracle() -> Oracle:
    """The process-wide oracle over ``<cache root>/latency.sqlite``."""
    return _oracle_for(str(cache_root() / "latency.sqlite"))
