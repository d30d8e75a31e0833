"""A kernel-level latency predictor per device, learned from exact measurements.

The kernels TVM emits for a network are read from its prepared (fused) module before any LLVM
build (:mod:`omnic.compile.features`); each kernel's time per call is predicted and the network's
latency is their sum through a fitted overhead model (:mod:`.model`). Samples are zoo variants
(:mod:`omnic.examples.variants`) compiled untuned and measured (:mod:`.samples`).

Cost: :meth:`KernelLatencyPredictor.predict` traces, lowers and prepares the model (torch.export
dominates; no LLVM build). Callers that already hold kernel features (a search that prepared its
candidates) use :meth:`~KernelLatencyPredictor.predict_features` or
:meth:`~KernelLatencyPredictor.predict_many`, which only run the regressor (distinct kernels are
predicted once and remembered).

Data lives under ``<cache>/predictors/``: ``samples-<device>.jsonl`` (one measured network per
line, with its kernels' features and per-call times) and ``<device>-v<N>.json`` plus
``<device>-v<N>.ubj`` (the XGBoost model) for each saved version.

    from omnic.oracle import predictor as P
    samples = P.collect(P.fit_variants(40), "host")
    ms = P.KernelLatencyPredictor("host").fit(samples).predict(model, "host", x)
"""
from omnic.compile.features import FEATURES, WORK_TERMS, kernel_features, prepare, primfunc_features
from omnic.core.errors import PredictorError
from omnic.examples.variants import (EVAL_SEED, FAMILIES, FIT_SEED, Variant, eval_variants, fit_variants,
                                     sample_variants)
from omnic.oracle.predictor.evaluation import Evaluation, accuracy
from omnic.oracle.predictor.model import FORMAT_VERSION, TARGETS, KernelLatencyPredictor, is_view
from omnic.oracle.predictor.samples import (SCHEMA_VERSION, TUNING_STATE, collect, collect_sample, load_samples,
                                            predictors_dir, remeasure, samples_path)

__all__ = [
    "EVAL_SEED", "Evaluation", "FAMILIES", "FEATURES", "FIT_SEED", "FORMAT_VERSION", "KernelLatencyPredictor",
    "PredictorError", "SCHEMA_VERSION", "TARGETS", "TUNING_STATE", "Variant", "WORK_TERMS", "accuracy",
    "collect", "collect_sample", "eval_variants", "fit_variants", "is_view", "kernel_features",
    "load_samples", "predictors_dir", "prepare", "primfunc_features", "remeasure", "sample_variants",
    "samples_path",
]
