"""The latency oracle: exact compiled measurements, stored so nothing is measured twice.

The process-wide oracle, wired to ``engine.compile``, is :func:`omnic.engine.default_oracle`.
"""
from omnic.oracle.oracle import CompileFn, Oracle
from omnic.oracle.store import LatencyStore, StoreKey

__all__ = ["CompileFn", "LatencyStore", "Oracle", "StoreKey"]
