"""The kernel-level latency model of one device: fitted on samples, saved per version.

Each kernel's time per call is predicted by :class:`_KernelModel`: a kernel measured before gets
its measured time; any other gets a linear model over its loop-nest work, corrected by XGBoost
regressors. Network latency is the sum of the predicted kernels times their call counts, passed
through a fitted linear overhead model ``a * sum + b * calls + c`` (VM dispatch, allocation,
cache effects).

What is predicted (``target``, recorded in the saved file): the oracle's end-to-end latency
``e2e_ms`` (the default): for each sample the fastest of the oracle-protocol medians taken over
its measurement sessions, since interference on a shared machine only ever adds time; or its
fastest repeat ``e2e_min_ms``; or ``kernel_sum_ms``, the sum of each kernel's fastest in-graph
time (what the network costs with the cores to itself). Kernels are always fitted on their
fastest in-graph times; the overhead model maps their sum to the target.

Saved as ``<cache>/predictors/<device>-v<N>.json`` plus ``<device>-v<N>.ubj`` (the XGBoost model).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnic.compile import features
from omnic.compile.features import FEATURES, WORK_TERMS
from omnic.core.deployment import Deployment
from omnic.core.errors import PredictorError
from omnic.core.ir import TracedModel, trace
from omnic.oracle.predictor.evaluation import Evaluation, accuracy
from omnic.oracle.predictor.samples import SCHEMA_VERSION, TUNING_STATE, file_stem, predictors_dir

FORMAT_VERSION = 2  # 2: linear base model + residual trees + exact-kernel table


def is_view(kernel: dict[str, Any]) -> bool:
    """A kernel made only of reshapes: the VM runs it as ``vm.builtin.reshape`` (a view), not a call."""
    f = kernel["features"]
    return f.get("tok_reshape", 0) > 0 and f.get("tok_other", 0) == 0 and all(
        v == 0 for k, v in f.items() if k.startswith("tok_") and k != "tok_reshape")


def _vector(kernel: dict[str, Any]) -> np.ndarray:
    # Cached on the kernel dict: a screening loop predicts the same kernels many times, and
    # building rows from the feature dicts costs more than the regressor itself.
    x = kernel.get("_x")
    if x is None:
        f = kernel["features"]
        x = kernel["_x"] = np.array([float(f.get(n, np.nan)) for n in FEATURES], dtype=np.float32)
    return x


def _matrix(kernels: Sequence[dict[str, Any]]) -> np.ndarray:
    if not kernels:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    return np.stack([_vector(k) for k in kernels])


_XGB_PARAMS = {"n_estimators": 300, "max_depth": 4, "learning_rate": 0.1, "subsample": 0.9,
               "colsample_bytree": 0.9, "min_child_weight": 1.0, "reg_lambda": 1.0, "n_jobs": 1}


def _kernel_rows(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Measured kernels of ``samples``: rows, the network index of each, and ms per call (the
    fastest of the instrumented runs: on a shared machine the slower runs are interference, and
    fitting on medians predicted held-out networks worse)."""
    rows, groups, targets = [], [], []
    for gi, s in enumerate(samples):
        for k in s["kernels"]:
            if k.get("ms_per_call") is None:
                continue
            rows.append(k)
            groups.append(gi)
            targets.append(k["ms_per_call"])
    return rows, np.asarray(groups), np.asarray(targets, dtype=float)


def _fit_xgb(X: np.ndarray, y: np.ndarray, w: np.ndarray, seed: int = 0):
    import xgboost as xgb

    model = xgb.XGBRegressor(objective="reg:squarederror", random_state=seed, **_XGB_PARAMS)
    model.fit(X, y, sample_weight=w)
    return model


# Kernel kinds that share one linear base model (a kind with few fitted kernels uses the global one).
_BASE_GROUPS = {"conv": "conv", "gconv": "conv", "dwconv": "dwconv", "matmul": "matmul", "pool": "pool",
                "reduce": "reduce", "softmax": "reduce", "layer_norm": "reduce", "injective": "injective"}
_MIN_GROUP_ROWS = 12


def _work(kernels: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([[float(k["features"].get(t, 0.0)) for t in WORK_TERMS] for k in kernels], dtype=float)


def _row_key(kernel: dict[str, Any]) -> str:
    """Identity of a kernel for the exact table: every feature (op tokens, shapes, bytes) equal."""
    return hashlib.sha1(_vector(kernel).tobytes()).hexdigest()[:20]


class _KernelModel:
    """ms per call of an unscheduled kernel: exact table, else linear base x residual trees.

    1. Exact table: a kernel identical to a fitted one (same op tokens, shapes and bytes) gets the
       median of its measured times; a search space's candidates share most of their kernels.
    2. Linear base: non-negative least squares (relative error) of ms over the loop-nest work
       terms (:func:`_loop_terms`), one per kind group. It carries the extrapolation to sizes
       outside the fitted range.
    3. Residual trees: XGBoost on ln(ms / base) from all features plus ln(base), for what is not
       linear (cache misses of strided loops, vectorised epilogues). A ratio, so outside the
       fitted range it stays a bounded correction.
    """

    def __init__(self) -> None:
        self.theta: dict[str, list[float]] = {}
        self.scale: list[float] = []
        self.trees: Any = None
        self.table: dict[str, float] = {}

    def _base(self, kernels: Sequence[dict[str, Any]]) -> np.ndarray:
        T = _work(kernels) / np.asarray(self.scale)
        groups = [_BASE_GROUPS.get(k["features"].get("kind", "injective"), "injective") for k in kernels]
        theta = np.array([self.theta.get(g, self.theta["*"]) for g in groups])
        return np.maximum(np.einsum("ij,ij->i", T, theta), 1e-6)

    def _tree_input(self, kernels: Sequence[dict[str, Any]], base: np.ndarray) -> np.ndarray:
        return np.column_stack([_matrix(kernels), np.log(base)]).astype(np.float32)

    def fit(self, kernels: Sequence[dict[str, Any]], ms: np.ndarray, weight: np.ndarray, seed: int = 0) -> "_KernelModel":
        from scipy.optimize import nnls

        T = _work(kernels)
        self.scale = [float(v) if v > 0 else 1.0 for v in T.max(axis=0)]
        T = T / np.asarray(self.scale)
        groups = np.array([_BASE_GROUPS.get(k["features"].get("kind", "injective"), "injective") for k in kernels])

        def solve(mask: np.ndarray) -> list[float]:
            A = T[mask] / ms[mask, None] * np.sqrt(weight[mask])[:, None]
            theta, _ = nnls(A, np.sqrt(weight[mask]), maxiter=50 * A.shape[1])
            return [float(v) for v in theta]

        self.theta = {"*": solve(np.ones(len(ms), dtype=bool))}
        for g in sorted(set(groups)):
            if (groups == g).sum() >= _MIN_GROUP_ROWS:
                self.theta[g] = solve(groups == g)
        base = self._base(kernels)
        self.trees = _fit_xgb(self._tree_input(kernels, base), np.log(ms / base), weight, seed)
        by_key: dict[str, list[float]] = {}
        for k, v in zip(kernels, ms):
            by_key.setdefault(_row_key(k), []).append(float(v))
        self.table = {key: float(statistics.median(v)) for key, v in by_key.items()}
        return self

    def predict(self, kernels: Sequence[dict[str, Any]], booster: Any = None) -> np.ndarray:
        if not kernels:
            return np.zeros(0)
        base = self._base(kernels)
        X = self._tree_input(kernels, base)
        # inplace_predict skips the DMatrix construction: several times faster on small batches
        resid = (booster or self.trees.get_booster()).inplace_predict(X)
        out = base * np.exp(resid)
        for i, k in enumerate(kernels):
            exact = self.table.get(_row_key(k))
            if exact is not None:
                out[i] = exact
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "scale": self.scale, "work_terms": list(WORK_TERMS), "table": self.table}

    @classmethod
    def from_dict(cls, d: dict[str, Any], trees: Any) -> "_KernelModel":
        m = cls()
        m.theta, m.scale, m.table, m.trees = d["theta"], d["scale"], d["table"], trees
        return m


def _network_terms(samples: Sequence[dict[str, Any]], kernel_ms: Sequence[np.ndarray]) -> np.ndarray:
    """Per network: [sum over kernels of calls x ms, number of kernel calls, 1]."""
    terms = []
    for s, ms in zip(samples, kernel_ms):
        calls = np.array([k["calls"] for k in s["kernels"]], dtype=float)
        terms.append([float(np.dot(calls, ms)), float(calls.sum()), 1.0])
    return np.asarray(terms)


#: What a predictor can be fitted to predict (see :class:`KernelLatencyPredictor`).
TARGETS = ("e2e_ms", "e2e_min_ms", "kernel_sum_ms")


class KernelLatencyPredictor:
    """Kernel-level XGBoost latency model of one device (and tuning state).

    Args:
        device: Device name the samples were measured on.
        tuning_state: What builds the samples describe (``"untuned"``).
        target: Which measured latency it predicts: ``"e2e_ms"``, the oracle's standard
            protocol (median of repeats); ``"e2e_min_ms"``, the fastest repeat; or
            ``"kernel_sum_ms"``, the sum of each kernel's fastest in-graph time, which
            approximates the network's cost when no other process competes for the cores
            (on a shared machine the end-to-end figures swing between runs).
    """

    def __init__(self, device: str = "host", *, tuning_state: str = TUNING_STATE, target: str = "e2e_ms"):
        if target not in TARGETS:
            raise PredictorError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.device = device
        self.tuning_state = tuning_state
        self.target = target
        self.version: int | None = None
        self.model: Any = None
        self.calibration = (1.0, 0.0, 0.0)  # a * kernel_sum + b * calls + c
        self.info: dict[str, Any] = {}
        self._cache: dict[tuple[str, str], float] = {}
        self._booster_cache: tuple[Any, Any] | None = None
        self._memo: dict[bytes, float] = {}  # feature row -> predicted ms per call

    # -------------------------------------------------------------------------------- fitting
    def fit(self, samples: Sequence[dict[str, Any]], *, folds: int = 4, seed: int = 0) -> "KernelLatencyPredictor":
        """Fit the kernel model (:class:`_KernelModel`) and the network overhead model.

        Kernels are weighted by their share of their network's time, since that is what network
        accuracy depends on. The overhead model ``e2e = a * sum + b * calls + c`` is fitted on
        out-of-fold kernel predictions (folds split by network, exact table included), so it
        corrects the kernel model's bias on unseen networks rather than its training fit.

        Raises:
            PredictorError: Fewer than 2 usable samples.
        """
        samples = [s for s in samples if s.get(self.target)]
        if len(samples) < 2:
            raise PredictorError(f"need at least 2 measured networks to fit, got {len(samples)}; "
                                 f"run `omnic predictor fit --device {self.device} --samples 40`")
        rows, groups, ms = _kernel_rows(samples)
        totals = {gi: sum(k["ms_per_call"] * k["calls"] for k in s["kernels"] if k.get("ms_per_call"))
                  for gi, s in enumerate(samples)}
        w = np.array([r["ms_per_call"] * r["calls"] / totals[g] for r, g in zip(rows, groups)])
        w = 0.05 + w  # keep tiny kernels in the fit: there are many of them
        self.model = _KernelModel().fit(rows, ms, w, seed)

        # out-of-fold kernel predictions for the overhead fit
        k = min(folds, len(samples))
        oof = np.zeros_like(ms)
        if k >= 2:
            order = list(range(len(samples)))
            random.Random(seed).shuffle(order)
            fold_of = {g: i % k for i, g in enumerate(order)}
            fold = np.array([fold_of[g] for g in groups])
            for f in range(k):
                test = np.flatnonzero(fold == f)
                train = np.flatnonzero(fold != f)
                part = _KernelModel().fit([rows[i] for i in train], ms[train], w[train], seed)
                oof[test] = part.predict([rows[i] for i in test])
        else:
            oof = self.model.predict(rows)
        kernel_ms = [self._fill(s["kernels"], oof[groups == gi]) for gi, s in enumerate(samples)]
        terms = _network_terms(samples, kernel_ms)
        e2e = np.array([s[self.target] for s in samples])
        self.calibration = self._fit_calibration(terms, e2e)
        self.info = {"n_networks": len(samples), "n_kernel_samples": int(len(rows)),
                     "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "variants": [s["key"] for s in samples]}
        self._cache.clear()
        self._memo.clear()
        return self

    @staticmethod
    def _fill(kernels: Sequence[dict[str, Any]], pred_for_measured: np.ndarray) -> np.ndarray:
        """Kernel ms in the order of ``kernels``; unmeasured kernels get 0 (they were never timed)."""
        out, it = [], iter(pred_for_measured)
        for k in kernels:
            out.append(next(it) if k.get("ms_per_call") is not None else 0.0)
        return np.asarray(out, dtype=float)

    @staticmethod
    def _fit_calibration(terms: np.ndarray, e2e: np.ndarray) -> tuple[float, float, float]:
        # Relative least squares (rows divided by the measured latency): the accuracy target is
        # relative, and plain least squares would let the slowest networks dominate.
        if len(e2e) < 3:
            return 1.0, 0.0, 0.0
        A = terms / e2e[:, None]
        coef, *_ = np.linalg.lstsq(A, np.ones_like(e2e), rcond=None)
        a, b, c = (float(v) for v in coef)
        if a <= 0:  # degenerate fit on too few networks; fall back to the plain sum
            return 1.0, 0.0, 0.0
        return a, b, c

    # ----------------------------------------------------------------------------- predicting
    def _require_model(self) -> None:
        if self.model is None:
            raise PredictorError(f"the predictor for {self.device!r} is not fitted; call fit() or "
                                 f"KernelLatencyPredictor.load({self.device!r})")

    def _booster(self):
        if self._booster_cache is None or self._booster_cache[0] is not self.model:
            self._booster_cache = (self.model, self.model.trees.get_booster())
        return self._booster_cache[1]

    def forget_kernels(self) -> None:
        """Drop the remembered kernel predictions (to time predictions of kernels never seen)."""
        self._memo.clear()

    def predict_kernels(self, kernels: Sequence[dict[str, Any]]) -> np.ndarray:
        """Predicted ms per call of each kernel (``kernel_features`` rows)."""
        self._require_model()
        if not kernels:
            return np.zeros(0)
        keys = [_vector(k).tobytes() for k in kernels]
        # Candidates in a search share most of their kernels: predict each distinct kernel once.
        todo = list({key: i for i, key in enumerate(keys) if key not in self._memo}.values())
        if todo:
            if len(self._memo) > 1_000_000:
                self._memo.clear()
            pred = self.model.predict([kernels[i] for i in todo], self._booster())
            self._memo.update((keys[i], float(v)) for i, v in zip(todo, pred))
        ms = np.array([self._memo[key] for key in keys])
        # reshape-only kernels become views in the VM: never called, never timed, free
        views = [k["_view"] if "_view" in k else k.setdefault("_view", is_view(k)) for k in kernels]
        return np.where(views, 0.0, ms)

    def predict_features(self, kernels: Sequence[dict[str, Any]]) -> float:
        """Network latency in ms from its kernels' features (no TVM work at all)."""
        ms = self.predict_kernels(kernels)
        calls = np.array([k["calls"] for k in kernels], dtype=float)
        a, b, c = self.calibration
        return float(a * np.dot(calls, ms) + b * calls.sum() + c)

    def predict_many(self, networks: Sequence[Sequence[dict[str, Any]]]) -> list[float]:
        """Latencies of many networks in one regressor call (for screening candidates)."""
        self._require_model()
        flat = [k for n in networks for k in n]
        ms = self.predict_kernels(flat) if flat else np.zeros(0)
        a, b, c = self.calibration
        out, i = [], 0
        for n in networks:
            calls = np.array([k["calls"] for k in n], dtype=float)
            out.append(float(a * np.dot(calls, ms[i:i + len(n)]) + b * calls.sum() + c))
            i += len(n)
        return out

    def predict_prepared(self, prepared: Any) -> float:
        """Network latency in ms of a prepared (fused) module; reads its TIR, builds nothing."""
        return self.predict_features(features.kernel_features(prepared))

    def predict(self, model: Any, deployment: Any = None, example_inputs: Any = None) -> float:
        """Predicted latency in ms of ``model`` on the deployment's device.

        Lowers and prepares the model (seconds, mostly torch.export; no LLVM build), then
        predicts from its kernels. Results are cached per (structural hash, input shapes).

        Raises:
            PredictorError: The deployment's device or precision is not the predictor's.
        """
        deployment = Deployment.coerce(deployment if deployment is not None else self.device)
        if deployment.device != self.device:
            raise PredictorError(f"this predictor is for {self.device!r}, not {deployment.device!r}; "
                                 f"load KernelLatencyPredictor.load({deployment.device!r})")
        traced = model if isinstance(model, TracedModel) and example_inputs is None else trace(model, example_inputs)
        key = (traced.structural_hash, json.dumps([list(s) for s in traced.input_shapes]) + deployment.precision)
        if key not in self._cache:
            prepared, _, _ = features.prepare(traced, deployment)
            self._cache[key] = self.predict_prepared(prepared)
        return self._cache[key]

    def evaluate(self, samples: Sequence[dict[str, Any]]) -> Evaluation:
        """Accuracy on measured samples (use networks that were not in the fit)."""
        preds = [self.predict_features(s["kernels"]) for s in samples]
        return accuracy([s[self.target] for s in samples], preds, [s["key"] for s in samples])

    # ---------------------------------------------------------------------------- persistence
    @staticmethod
    def versions(device: str) -> list[int]:
        """Saved versions of a device's predictor, oldest first."""
        pat = re.compile(rf"^{re.escape(file_stem(device))}-v(\d+)\.json$")
        return sorted(int(m.group(1)) for p in predictors_dir().iterdir() if (m := pat.match(p.name)))

    def save(self, *, version: int | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write ``<cache>/predictors/<device>-v<N>.json`` and the XGBoost model beside it.

        Args:
            version: Version number; default one above the newest saved.
            extra: More metadata to record (e.g. the evaluation).

        Returns:
            The JSON file's path.
        """
        self._require_model()
        existing = self.versions(self.device)
        version = version if version is not None else (existing[-1] + 1 if existing else 1)
        base = predictors_dir() / f"{file_stem(self.device)}-v{version}"
        model_file = base.with_suffix(".ubj")
        self.model.trees.save_model(str(model_file))
        meta = {"format": FORMAT_VERSION, "device": self.device, "version": version,
                "tuning_state": self.tuning_state, "target": self.target, "schema_version": SCHEMA_VERSION,
                "feature_schema": list(FEATURES), "xgb_model": model_file.name,
                "xgb_params": _XGB_PARAMS, "kernel_model": self.model.to_dict(),
                "calibration": {"a": self.calibration[0], "b_per_call_ms":
                                                            self.calibration[1], "c_ms": self.calibration[2]},
                "train": self.info, **(extra or {})}
        path = base.with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path)  # the JSON is the commit point: a half-written version is never loaded
        self.version = version
        return path

    @classmethod
    def load(cls, device: str = "host", version: int | None = None) -> "KernelLatencyPredictor":
        """The newest (or the given) saved predictor of ``device``.

        Raises:
            PredictorError: None saved, or saved with another feature schema.
        """
        import xgboost as xgb

        versions = cls.versions(device)
        if not versions or (version is not None and version not in versions):
            raise PredictorError(
                f"no saved latency predictor for {device!r}" + (f" version {version}" if version else "") +
                f" under {predictors_dir()}; fit one with `omnic predictor fit --device {device}`")
        version = version if version is not None else versions[-1]
        base = predictors_dir() / f"{file_stem(device)}-v{version}"
        meta = json.loads(base.with_suffix(".json").read_text())
        if (meta.get("schema_version") != SCHEMA_VERSION or meta.get("feature_schema") != list(FEATURES)
                or meta.get("format") != FORMAT_VERSION):
            raise PredictorError(f"{base}.json uses feature schema {meta.get('schema_version')}, this omnic "
                                 f"uses {SCHEMA_VERSION}; refit with `omnic predictor fit --device {device}`")
        pred = cls(device, tuning_state=meta["tuning_state"], target=meta.get("target", "e2e_ms"))
        trees = xgb.XGBRegressor()
        trees.load_model(str(base.parent / meta["xgb_model"]))
        pred.model = _KernelModel.from_dict(meta["kernel_model"], trees)
        cal = meta["calibration"]
        pred.calibration = (float(cal["a"]), float(cal["b_per_call_ms"]), float(cal["c_ms"]))
        pred.version = version
        pred.info = meta
        return pred
