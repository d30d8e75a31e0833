"""The latency oracle: exact compiled measurements, stored so nothing is measured twice."""
from omnic.oracle.store import LatencyStore, StoreKey
from omnic.oracle.oracle import Oracle, default_oracle

__all__ = ["LatencyStore", "StoreKey", "Oracle", "default_oracle"]
