"""The search's own latency model used to screen candidates: a regressor over the architecture
encoding, refitted to the exact measurements a search has made so far.

(Not :class:`omnic.oracle.predictor.LatencyPredictor`, which predicts any graph's latency from its
kernels; this one only interpolates between the subnets of one supernet.)

Features are the subnet's exact FLOPs, params and memory estimate plus every choice normalised
to [0, 1]. Ridge regression on log-latency is the default (few points, smooth); XGBoost is used
when asked for and enough measurements exist.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np


class ArchLatencyModel:
    """Predicts a configuration's latency (ms) from its encoding.

    Args:
        features: Maps a configuration to its feature vector.
        kind: ``"ridge"`` or ``"xgboost"`` (falls back to ridge under 20 measurements).
    """

    def __init__(self, features: Callable[[Mapping[str, Any]], Sequence[float]], kind: str = "ridge"):
        self.features = features
        self.kind = kind
        self.model: Any = None
        self.n = 0
        self.mae_rel: float | None = None
        self._fallback: float | None = None

    def fit(self, cfgs: Sequence[Mapping[str, Any]], latencies: Sequence[float]) -> "ArchLatencyModel":
        self.n = len(cfgs)
        if self.n == 0:
            self.model = None
            return self
        X = self._matrix(cfgs)
        y = np.log(np.asarray(latencies, dtype=np.float64))
        self._fallback = float(np.exp(y.mean()))
        if self.n == 1:
            self.model = None
            return self
        if self.kind == "xgboost" and self.n >= 20:
            import xgboost as xgb

            self.model = xgb.XGBRegressor(n_estimators=150, max_depth=3, learning_rate=0.1, subsample=1.0,
                                          n_jobs=1, random_state=0)
        else:
            from sklearn.linear_model import Ridge
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            self.model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        self.model.fit(X, y)
        pred = np.exp(self.model.predict(X))
        self.mae_rel = float(np.mean(np.abs(pred - np.exp(y)) / np.exp(y)))
        return self

    def _matrix(self, cfgs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        X = np.asarray([self.features(c) for c in cfgs], dtype=np.float64)
        # with few measurements only the cost columns (FLOPs, params, memory) are used: a
        # regression on dozens of choice columns would fit the noise
        return X if self.n >= 12 else X[:, :3]

    def predict(self, cfgs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if self.model is None:
            return np.full(len(cfgs), self._fallback if self._fallback is not None else math.nan)
        X = self._matrix(cfgs)
        return np.exp(self.model.predict(X))
