"""A kernel-level latency predictor per device, learned from exact measurements.

The fused kernels TVM emits are known at compile time: :func:`omnic.compile.pipeline.prepare` returns the
fused Relax module whose ``call_tir`` PrimFuncs are exactly the kernels the VM will call. So the
predictor never guesses fusion rules. For each PrimFunc it reads features from the TIR (op kind
tokens from the name, FLOPs from the loop extents of the reduction block, bytes of inputs,
weights and outputs, key conv/matmul dims, and the work of each loop nest) and predicts its time
per call (:class:`_KernelModel`): a kernel measured before gets its measured time; any other gets
a linear model over its loop-nest work, corrected by XGBoost regressors. Network latency is the
sum of the predicted kernels times their call counts, passed through a fitted linear overhead
model ``a * sum + b * calls + c`` (VM dispatch, allocation, cache effects).

Tuning state: the predictor describes the code ``engine.compile`` builds for a deployment with
*no tuning database applied* (``build.build(prepared, spec, target, None)``). Tuned kernels
run at a different speed; a predictor for a tuned device needs samples collected from tuned
builds, which is why the saved file records ``tuning_state``.

What is predicted (``target``, recorded in the saved file): the oracle's end-to-end latency
``e2e_ms`` (the default): for each sample the fastest of the oracle-protocol medians taken over
its measurement sessions, since a shared 2-core VM's interference only ever adds time; or its
fastest repeat ``e2e_min_ms``; or ``kernel_sum_ms``, the sum of each kernel's fastest in-graph
time (what the network costs with the cores to itself). Kernels are always fitted on their
fastest in-graph times; the overhead model maps their sum to the target.

Cost: :meth:`LatencyPredictor.predict` traces, lowers and prepares the model (torch.export
dominates, 1-5 s on a quiet machine; no LLVM build). Callers that already hold kernel
features (a search that prepared its candidates) use :meth:`~LatencyPredictor.predict_features`
or :meth:`~LatencyPredictor.predict_many`, which only run the regressor (hundreds to thousands
of networks per second; distinct kernels are predicted once and remembered).

Data lives under ``<cache>/predictors/``: ``samples-<device>.jsonl`` (one measured network per
line, with its kernels' features and per-call times) and ``<device>-v<N>.json`` plus
``<device>-v<N>.ubj`` (the XGBoost model) for each saved version.
"""
from __future__ import annotations

import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from omnic.core.cache import cache_root
from omnic.core.errors import PredictorError

#: Bumped whenever the meaning of a feature changes; samples with another version are re-collected.
SCHEMA_VERSION = 4  # 2: loop-nest work terms, MobileNetV2 kernels and depths; 3: e2e = fastest of
#: passes; 4: measurement sessions from a saved library
FORMAT_VERSION = 2  # 2: linear base model + residual trees + exact-kernel table
TUNING_STATE = "untuned"

# Op-kind tokens read from PrimFunc names ("fused_conv2d3_add2_maximum1_minimum11" ->
# conv2d, add, maximum, minimum). Counted, so a longer fused epilogue has larger counts.
_TOKENS = ("conv2d", "matmul", "dense", "mean", "sum", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
           "softmax", "layer_norm", "gelu", "relu", "add", "subtract", "multiply", "divide", "maximum",
           "minimum", "tanh", "sigmoid", "exp", "erf", "transpose", "reshape", "broadcast_to", "take",
           "concatenate", "strided_slice", "split", "squeeze", "expand_dims", "power", "sqrt", "rsqrt",
           "clip", "where", "cast")
_KINDS = ("conv", "dwconv", "gconv", "matmul", "reduce", "pool", "softmax", "layer_norm", "injective")

FEATURES: tuple[str, ...] = (
    ("log_flops", "log_main_points", "log_total_points", "log_epilogue_points", "log_reduce_len", "log_spatial",
     "log_in_bytes", "log_weight_bytes", "log_out_bytes", "log_bytes", "arith_intensity",
     "n_blocks", "n_epilogue", "inner_spatial", "inner_reduce", "log_inner_spatial", "log_inner_reduce",
     "H", "W", "cin", "cout", "kh", "kw", "stride", "groups", "log_cin", "log_cout", "log_hw",
     "n_inputs", "n_weights")
    + tuple(f"kind_{k}" for k in _KINDS) + tuple(f"tok_{t}" for t in _TOKENS) + ("tok_other",))



# ------------------------------------------------------------------------------ feature extraction
def _prod(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _blocks(stmt: Any) -> list[Any]:
    """Every SBlock under ``stmt`` (root excluded), in program order."""
    found: list[Any] = []

    def walk(node: Any) -> None:
        if node is None:
            return
        kind = type(node).__name__
        if kind == "SBlockRealize":
            walk(node.block)
            return
        if kind == "SBlock":
            if node.name_hint != "root":
                found.append(node)
            walk(node.body)
            return
        if kind == "SeqStmt":
            for s in node.seq:
                walk(s)
            return
        if kind == "IfThenElse":
            walk(node.then_case)
            walk(node.else_case)
            return
        body = getattr(node, "body", None)
        if body is not None:
            walk(body)

    walk(stmt)
    return found


def _block_dims(block: Any) -> tuple[list[int], list[int]]:
    """(spatial extents, reduction extents) of a block's iteration domain."""
    spatial, reduce = [], []
    for iv in block.iter_vars:
        extent = int(iv.dom.extent)
        # IterVar.iter_type: 0 = data parallel, 2 = comm reduce
        (reduce if int(iv.iter_type) == 2 else spatial).append(extent)
    return spatial, reduce


def _name_tokens(name: str) -> dict[str, int]:
    counts = {t: 0 for t in _TOKENS}
    body = name[len("fused_"):] if name.startswith("fused_") else name
    # Names join op names (which themselves contain "_") with "_" and add numeric suffixes, so
    # match the known tokens greedily, longest first, on the digit-stripped name.
    # numeric suffixes only ("conv2d12" -> "conv2d", "add3" -> "add"); the "2" of conv2d stays
    text = re.sub(r"\d+(?=_|$)", "", body)
    for tok in sorted(_TOKENS, key=len, reverse=True):
        pattern = rf"(?:^|_){re.escape(tok)}(?=_|$)"
        n = len(re.findall(pattern, text))
        if n:
            counts[tok] += n
            text = re.sub(pattern, "_", text)
    other = len([p for p in text.split("_") if p])
    counts_out = {f"tok_{t}": c for t, c in counts.items()}
    counts_out["tok_other"] = other
    return counts_out


def _buffer_bytes(buf: Any) -> int:
    dtype = str(buf.dtype)
    bits = int(re.sub(r"\D", "", dtype) or 32)
    return _prod(int(d) for d in buf.shape) * max(1, bits // 8)


def primfunc_features(name: str, func: Any) -> dict[str, float]:
    """Features of one fused kernel (a TIR PrimFunc of the prepared module).

    FLOPs: 2 x the iteration points of the main reduction block (one multiply-add per point) for
    conv2d / matmul kernels, else one per iteration point of every block.

    Args:
        name: The PrimFunc's global name (op kinds are read from it).
        func: The ``tvm.tirx.PrimFunc``.

    Returns:
        A dict over :data:`FEATURES`.
    """
    blocks = _blocks(func.body)
    dims = [_block_dims(b) for b in blocks]
    points = [_prod(s) * _prod(r) for s, r in dims]
    total_points = sum(points) or 1
    reducing = [i for i, (_, r) in enumerate(dims) if r]
    main = max(reducing, key=lambda i: points[i]) if reducing else (max(range(len(points)), key=points.__getitem__)
                                                                     if points else None)
    spatial, reduce = dims[main] if main is not None else ([1], [])
    main_points = points[main] if main is not None else 1
    main_name = blocks[main].name_hint if main is not None else ""

    attrs = func.attrs
    weight_idx = {int(i) for i in (attrs.get("layout_free_buffers", []) if attrs is not None else [])}
    # 0.27 PrimFuncs take Buffers as params (older TVM: Vars plus a buffer_map)
    bmap = getattr(func, "buffer_map", None)
    buffers = [bmap[p] if bmap is not None and p in bmap else p for p in func.params]
    buffers = [b for b in buffers if hasattr(b, "shape")]
    out_buf = buffers[-1] if buffers else None
    ins = [b for i, b in enumerate(buffers[:-1]) if i not in weight_idx]
    weights = [b for i, b in enumerate(buffers[:-1]) if i in weight_idx]
    in_bytes = sum(_buffer_bytes(b) for b in ins)
    weight_bytes = sum(_buffer_bytes(b) for b in weights)
    out_bytes = _buffer_bytes(out_buf) if out_buf is not None else 0

    toks = _name_tokens(name)
    is_conv = "conv2d" in main_name or toks["tok_conv2d"] > 0
    is_matmul = "matmul" in main_name or toks["tok_matmul"] > 0 or toks["tok_dense"] > 0
    H = W = cin = cout = kh = kw = stride = groups = 0
    kind = "injective"
    if is_conv and weights and ins and len(weights[0].shape) == 4 and len(ins[0].shape) == 4:
        # prepare() lays convs out as NHWC data / OHWI weights (CPU); the output is NHWC.
        wshape = [int(d) for d in weights[0].shape]
        ishape = [int(d) for d in ins[0].shape]
        oshape = [int(d) for d in out_buf.shape] if out_buf is not None and len(out_buf.shape) == 4 else None
        cout, kh, kw, cin_g = wshape
        cin = ishape[3]
        groups = max(1, cin // max(1, cin_g))
        if oshape is not None:
            H, W = oshape[1], oshape[2]
            stride = max(1, round(ishape[1] / max(1, oshape[1])))
        kind = "dwconv" if groups > 1 and groups == cin else ("gconv" if groups > 1 else "conv")
    elif is_conv:
        kind = "conv"
    elif is_matmul:
        kind = "matmul"
        if reduce:
            cin = _prod(reduce)
        cout = spatial[-1] if spatial else 0
        H = _prod(spatial[:-1]) if len(spatial) > 1 else 1
    elif toks["tok_softmax"]:
        kind = "softmax"
    elif toks["tok_layer_norm"]:
        kind = "layer_norm"
    elif toks["tok_max_pool2d"] or toks["tok_avg_pool2d"] or toks["tok_adaptive_avg_pool2d"]:
        kind = "pool"
    elif reducing:
        kind = "reduce"

    if kind in ("conv", "dwconv", "gconv", "matmul"):
        flops = 2.0 * main_points  # one multiply-add per point of the reduction block
    else:
        flops = float(total_points)
    all_bytes = in_bytes + weight_bytes + out_bytes

    def lg(v: float) -> float:
        return math.log2(1.0 + float(v))

    feats: dict[str, float] = {
        "log_flops": lg(flops), "log_main_points": lg(main_points), "log_total_points": lg(total_points),
        "log_epilogue_points": lg(total_points - main_points),
        "log_reduce_len": lg(_prod(reduce)), "log_spatial": lg(_prod(spatial)),
        "log_in_bytes": lg(in_bytes), "log_weight_bytes": lg(weight_bytes), "log_out_bytes": lg(out_bytes),
        "log_bytes": lg(all_bytes), "arith_intensity": flops / max(1, all_bytes),
        "n_blocks": len(blocks), "n_epilogue": max(0, len(blocks) - 1 - (1 if "pad" in " ".join(
            b.name_hint for b in blocks) else 0)),
        "inner_spatial": spatial[-1] if spatial else 1, "inner_reduce": reduce[-1] if reduce else 0,
        "log_inner_spatial": lg(spatial[-1] if spatial else 1), "log_inner_reduce": lg(reduce[-1] if reduce else 0),
        "H": H, "W": W, "cin": cin, "cout": cout, "kh": kh, "kw": kw, "stride": stride, "groups": groups,
        "log_cin": lg(cin), "log_cout": lg(cout), "log_hw": lg(H * W),
        "n_inputs": len(ins), "n_weights": len(weights),
        "flops": flops,  # raw, for reports (not a model feature)
    }
    feats.update(_loop_terms(dims))
    for k in _KINDS:
        feats[f"kind_{k}"] = 1.0 if kind == k else 0.0
    feats.update({k: float(v) for k, v in toks.items()})
    feats["kind"] = kind  # type: ignore[assignment]  # for reports
    return feats


#: The work terms of an unscheduled kernel (:func:`_loop_terms`): the linear base model's inputs.
WORK_TERMS = ("w_reduce_points", "w_reduce_entries", "w_short_reduce_points", "w_spatial_points",
              "w_spatial_entries", "w_blocks", "w_call")


def _loop_terms(dims: Sequence[tuple[list[int], list[int]]]) -> dict[str, float]:
    """How much work each kind of loop of an unscheduled kernel does.

    Untuned kernels are the loop nests TVM's lowering writes, one per block, its iteration
    variables in order (spatial, then reduction), run on one core: their time is close to
    linear in the iterations of the innermost statement (a scalar multiply-add in a reduction, a
    vectorisable store in an elementwise block) and in the entries of the innermost loop (loop
    overhead, accumulator init). A reduction whose innermost loop is short (a depthwise conv's
    kernel row, 3-7 iterations) pays its overhead per few points, so it has a term of its own.
    A linear model over these terms extrapolates to kernels larger than any it was fitted on,
    where trees would stay flat.
    """
    terms = dict.fromkeys(WORK_TERMS, 0.0)
    for spatial, reduce in dims:
        points = float(_prod(spatial) * _prod(reduce))
        if reduce:
            inner = max(1, reduce[-1])
            terms["w_short_reduce_points" if inner < 8 else "w_reduce_points"] += points
            terms["w_reduce_entries"] += points / inner
        else:
            inner = max(1, spatial[-1] if spatial else 1)
            terms["w_spatial_points"] += points
            terms["w_spatial_entries"] += points / inner
    terms["w_blocks"] = float(len(dims))
    terms["w_call"] = 1.0
    return terms


def kernel_features(prepared: Any) -> list[dict[str, Any]]:
    """The kernels of a prepared (fused) module: name, call count and features.

    Args:
        prepared: The module :func:`omnic.compile.pipeline.prepare` returns.

    Returns:
        One dict per distinct PrimFunc that ``main`` calls: ``{"name", "calls", "features"}``.
    """
    import tvm
    from tvm import relax

    calls: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            gv = expr.args[0]
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + 1

    for gv, func in prepared.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    out = []
    for gv, func in prepared.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint in calls:
            out.append({"name": gv.name_hint, "calls": calls[gv.name_hint],
                        "features": primfunc_features(gv.name_hint, func)})
    out.sort(key=lambda k: k["name"])
    return out


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


# ---------------------------------------------------------------------------------- variants
_FAMILIES = ("resnet", "mobilenet_v2", "mobilenet_v3_small", "conv_attention")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One architecture of a zoo family at one input resolution.

    Attributes:
        family: ``resnet``, ``mobilenet_v2``, ``mobilenet_v3_small`` or ``conv_attention``.
        params: Constructor arguments as sorted ``(name, value)`` pairs (JSON-friendly values).
        resolution: Square input side in pixels (batch 1, 3 channels).
    """

    family: str
    params: tuple[tuple[str, Any], ...]
    resolution: int

    @property
    def key(self) -> str:
        return f"{self.family}:{json.dumps(dict(self.params), sort_keys=True)}@{self.resolution}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["params"].items()}
        return cls(family=d["family"], params=tuple(sorted(params.items())), resolution=int(d["resolution"]))

    def build(self, seed: int = 0):
        """``(model in eval mode with calibrated BN, example input)``."""
        import torch

        from omnic.examples import zoo

        p = dict(self.params)
        torch.manual_seed(seed)
        if self.family == "resnet":
            model = zoo.ResNet(tuple(p["layers"]), tuple(p["widths"]), p.get("num_classes", 10), stem=p["stem"])
        elif self.family == "mobilenet_v2":
            depths = p.get("depths")
            model = zoo.MobileNetV2(p.get("num_classes", 10), width_mult=p["width_mult"], kernel=p.get("kernel", 3),
                                    depths=tuple(depths) if depths else None)
        elif self.family == "mobilenet_v3_small":
            model = zoo.MobileNetV3Small(p.get("num_classes", 10), width_mult=p["width_mult"])
        elif self.family == "conv_attention":
            model = zoo.ConvAttentionNet(p.get("num_classes", 10), dim=p["dim"], depth=p["depth"])
        else:
            raise PredictorError(f"unknown variant family {self.family!r}; known: {', '.join(_FAMILIES)}")
        shape = (1, 3, self.resolution, self.resolution)
        zoo.calibrate_bn(model, shape, seed=seed)  # default BN stats give denormals (TVM_NOTES 9.7.9)
        return model.eval(), torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))


def _random_variant(rng: random.Random, family: str) -> Variant:
    res = rng.choice((32, 40, 48, 56, 64, 72, 80, 96))
    ncls = rng.choice((10, 100))
    if family == "resnet":
        n_stages = rng.choice((3, 4))
        w0 = rng.choice((8, 12, 16, 24, 32))
        stem = "small" if res <= 48 else rng.choice(("small", "imagenet")) if w0 <= 16 else "imagenet"
        params = {"layers": [rng.choice((1, 2)) for _ in range(n_stages)],
                  "widths": [w0 * 2 ** i for i in range(n_stages)], "stem": stem, "num_classes": ncls}
    elif family == "mobilenet_v2":  # widths, depthwise kernels and depths, as an elastic search varies them
        params = {"width_mult": rng.choice((0.25, 0.35, 0.5, 0.75, 1.0)), "num_classes": ncls,
                  "kernel": rng.choice((3, 5, 7)),
                  "depths": [max(1, n + rng.choice((-1, 0, 0, 1))) for n in (1, 2, 3, 4, 3, 3, 1)]}
    elif family == "mobilenet_v3_small":
        params = {"width_mult": rng.choice((0.25, 0.5, 0.75, 1.0, 1.25)), "num_classes": ncls}
    else:
        res = rng.choice((32, 48, 64))
        params = {"dim": rng.choice((16, 24, 32, 48, 64)), "depth": rng.choice((1, 2, 3)), "num_classes": ncls}
    return Variant(family=family, params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                      for k, v in params.items())), resolution=res)


def sample_variants(n: int, *, seed: int = 0, exclude: Iterable[str] = (),
                    families: Sequence[str] = _FAMILIES) -> list[Variant]:
    """``n`` distinct random variants of the zoo families (round-robin over families).

    Args:
        n: How many.
        seed: Random seed (the fit and eval sets use different seeds).
        exclude: Variant keys to skip (e.g. the fit set, so held-out variants are unseen).
        families: Which families to draw from.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Variant] = []
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        v = _random_variant(rng, families[len(out) % len(families)])
        if v.key not in seen:
            seen.add(v.key)
            out.append(v)
    return out


FIT_SEED, EVAL_SEED = 1, 1001


# ------------------------------------------------------------------------------- measurement
def predictors_dir() -> Path:
    path = cache_root() / "predictors"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _safe(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device)


def samples_path(device: str) -> Path:
    return predictors_dir() / f"samples-{_safe(device)}.jsonl"


def _prepare(traced: Any, deployment: Any):
    from omnic.compile import frontend, pipeline
    from omnic.compile.target import tvm_target

    spec = deployment.spec
    target = tvm_target(spec, num_threads=deployment.threads)
    return pipeline.prepare(frontend.lower(traced), spec, target, deployment.precision), spec, target


def collect_sample(variant: Variant, deployment: Any = "host", *, runs: int = 15,
                   config: Any = None, passes: int = 4) -> dict[str, Any]:
    """Compile a variant untuned, save its library and measure it once (:func:`_measure_session`).

    Args:
        variant: The architecture to measure.
        deployment: A local deployment (device, precision, threads).
        runs: Instrumented runs per kernel round.
        config: End-to-end protocol (default :class:`omnic.core.measure.MeasureConfig()`, the
            oracle's); tests pass a cheaper one.
        passes: End-to-end measurements per session (at least 2).

    Returns:
        A JSON-friendly sample (see :func:`load_samples`).
    """
    from omnic.compile import build
    from omnic.core.deployment import Deployment
    from omnic.core.ir import trace

    deployment = Deployment.coerce(deployment)
    if not deployment.spec.local or deployment.is_remote:
        raise PredictorError(f"collecting samples needs a local device; {deployment.device!r} is not this machine")
    t0 = time.perf_counter()
    model, x = variant.build()
    traced = trace(model, x)
    prepared, spec, target = _prepare(traced, deployment)
    kernels = kernel_features(prepared)
    t1 = time.perf_counter()
    executable, _ = build.build(prepared, spec, target, None)
    library = _library_path(deployment.device, variant.key)
    executable.export_library(str(library))  # a later session re-measures it without rebuilding
    t2 = time.perf_counter()
    sample = {
        "schema_version": SCHEMA_VERSION, "device": deployment.device, "precision": deployment.precision,
        "tuning_state": TUNING_STATE, "variant": variant.to_dict(), "key": variant.key,
        "structural_hash": traced.structural_hash, "library": library.name,
        "input_shapes": [list(t.shape) for t in traced.example_inputs],
        "kernels": kernels, "sessions": 0,
        "prepare_s": round(t1 - t0, 3), "build_s": round(t2 - t1, 3), "created": time.time(),
    }
    _measure_session(sample, executable, deployment, runs=runs, config=config, passes=passes)
    sample["measure_s"] = round(time.perf_counter() - t2, 3)
    return sample


def _library_path(device: str, key: str) -> Path:
    import hashlib

    folder = predictors_dir() / f"libs-{_safe(device)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"


def _measure_session(sample: dict[str, Any], executable: Any, deployment: Any, *, runs: int, config: Any,
                     passes: int) -> None:
    """Measure ``sample``'s network once more (a *session*) and fold the result into it.

    A session is ``passes`` end-to-end measurements with the oracle's protocol, each on a fresh
    VM, interleaved with two rounds of instrumented kernel runs, so that they spread over
    several seconds. Across sessions every figure keeps its fastest value: a 2-core VM's speed
    swings by up to a third for seconds at a time (the same binary measured 14.0 and 19.1 ms a
    minute apart), and slow moments are the only noise there is, so the fastest of measurements
    spread in time is what the device itself does.

    Fields: ``e2e_ms`` (the fastest measurement of all sessions), ``e2e_first_ms`` (the very
    first, what a single oracle call sees), ``e2e_early_ms`` / ``e2e_again_ms`` (the fastest of
    the first session and of the last one; with one session, of its first and second half: two
    independent estimates whose agreement is the noise floor of the ground truth). Per kernel:
    the fastest of the instrumented runs minus the hook's own cost per call, estimated as the
    cheapest per-call time of a VM builtin (e.g. ``null_value``), which does no work.
    """
    from omnic.compile.runtime import LocalRuntime
    from omnic.core.measure import MeasureConfig, time_vm

    passes = max(2, passes)
    config = config or MeasureConfig()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(tuple(shape)).astype("float32") for shape in sample["input_shapes"]]
    e2e, rounds = [], []
    for i in range(passes):
        # a fresh VM for each pass, as the oracle measures a fresh load of the library
        runtime = LocalRuntime(executable)
        inputs = [runtime.to_device(a) for a in arrays]
        e2e.append(time_vm(runtime.vm, runtime.dev, inputs, config, device_name=deployment.device))
        if i in (0, passes // 2):
            rounds.append(_kernel_times(runtime.vm, inputs, runs=runs))
    rows = {key: {"calls": r["calls"], "builtin": r["builtin"],
                  "min_ms": min(rd[key]["min_ms"] for rd in rounds if key in rd),
                  "median_ms": float(statistics.median(rd[key]["median_ms"] for rd in rounds if key in rd))}
            for key, r in rounds[0].items()}
    builtin_per_call = [r["min_ms"] / r["calls"] for r in rows.values() if r["builtin"] and r["calls"]]
    hook_ms = min(builtin_per_call) if builtin_per_call else 0.0
    first = sample["sessions"] == 0
    missing = []
    for k in sample["kernels"]:
        r = rows.get(k["name"])
        if r is None or not r["calls"]:
            missing.append(k["name"])
            k.setdefault("ms_per_call", None)
            k.setdefault("ms_per_call_median", None)
            continue
        fastest = max(1e-5, r["min_ms"] / r["calls"] - hook_ms)
        median = max(1e-5, r["median_ms"] / r["calls"] - hook_ms)
        k["ms_per_call"] = min(fastest, k.get("ms_per_call") or fastest)
        k["ms_per_call_median"] = min(median, k.get("ms_per_call_median") or median)
    medians = [m.median_ms for m in e2e]
    repeats = [v for m in e2e for v in m.results_ms]
    if first:
        sample.update(e2e_ms=min(medians), e2e_passes_ms=medians, e2e_first_ms=medians[0],
                      e2e_early_ms=min(medians[:passes // 2]), e2e_again_ms=min(medians[passes // 2:]),
                      spread=e2e[0].spread, runs=e2e[0].runs, e2e_min_ms=min(repeats), repeats_ms=repeats,
                      hook_ms=hook_ms, unmatched_kernels=missing,
                      builtin_calls=sum(r["calls"] for r in rows.values() if r["builtin"]))
    else:
        if sample["sessions"] == 1:
            sample["e2e_early_ms"] = min(sample["e2e_passes_ms"])  # the whole first session
        sample.update(e2e_ms=min(sample["e2e_ms"], *medians), e2e_passes_ms=sample["e2e_passes_ms"] + medians,
                      e2e_again_ms=min(medians), e2e_min_ms=min(sample["e2e_min_ms"], *repeats))
    sample["sessions"] += 1
    sample["instrumented_kernel_ms"] = sum(r["median_ms"] for r in rows.values() if not r["builtin"])


def remeasure(sample: dict[str, Any], deployment: Any = "host", *, runs: int = 15, config: Any = None,
              passes: int = 4) -> dict[str, Any]:
    """One more measurement session of a stored sample, from its saved library (no rebuild).

    Raises:
        PredictorError: The library is gone (the sample predates library caching).
    """
    import tvm

    from omnic.core.deployment import Deployment

    deployment = Deployment.coerce(deployment)
    library = _library_path(deployment.device, sample["key"])
    if "input_shapes" not in sample or not library.exists():
        raise PredictorError(f"no saved library for {sample['key']}; collect it again")
    _measure_session(sample, tvm.runtime.load_module(str(library)), deployment, runs=runs, config=config,
                     passes=passes)
    return sample


def _kernel_times(vm, inputs: Sequence[Any], *, runs: int) -> dict[str, dict[str, Any]]:
    """Per VM call target: calls per run and the median and minimum over runs of its total ms.

    Contention from other processes only ever adds time, so the fastest run is the best
    estimate of the kernel's own cost on a shared machine.
    """
    from omnic.compile.profiler import instrumented_runs

    samples: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    for run in instrumented_runs(vm, inputs, runs=runs):
        per_run: dict[str, float] = {}
        for key, ms in run:
            per_run[key] = per_run.get(key, 0.0) + ms
            calls[key] = calls.get(key, 0) + 1
        for key, ms in per_run.items():
            samples.setdefault(key, []).append(ms)
    return {key: {"calls": calls[key] // runs, "median_ms": float(statistics.median(v)), "min_ms": float(min(v)),
                  "builtin": key.startswith("vm.builtin.")} for key, v in samples.items()}


def _no_cache(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return None  # an in-memory feature row cache ("_x"); the features dict is the record
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _kernel_sum(sample: dict[str, Any]) -> float:
    """Sum over kernels of calls x fastest in-graph time per call (hook cost removed)."""
    return float(sum(k["ms_per_call"] * k["calls"] for k in sample["kernels"] if k.get("ms_per_call")))


def load_samples(device: str, path: Path | None = None) -> list[dict[str, Any]]:
    """Stored samples of a device (current schema only; the last one per variant wins)."""
    path = path or samples_path(device)
    if not path.exists():
        return []
    by_key: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            s = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed writer
        if s.get("schema_version") == SCHEMA_VERSION and s.get("device") == device and s.get("e2e_ms"):
            s["kernel_sum_ms"] = _kernel_sum(s)
            by_key[s["key"]] = s
    return list(by_key.values())


def _append_sample(path: Path, sample: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(sample, default=_no_cache) + "\n")
    sample["kernel_sum_ms"] = _kernel_sum(sample)


def collect(variants: Sequence[Variant], deployment: Any = "host", *, path: Path | None = None,
            log=print, measure: bool = True, sessions: int = 1, **sample_kwargs: Any) -> list[dict[str, Any]]:
    """Samples for ``variants``: stored ones are reused, the rest measured and appended.

    A failing variant is logged and skipped, so one bad architecture does not lose a batch.
    With ``measure=False`` only stored samples are returned. With ``sessions`` > 1, every sample
    with fewer measurement sessions is measured again after the whole set (minutes later, from
    its saved library), and keeps its fastest figures (:func:`_measure_session`). ``sample_kwargs``
    go to :func:`collect_sample`.
    """
    from omnic.core.deployment import Deployment

    deployment = Deployment.coerce(deployment)
    path = path or samples_path(deployment.device)
    have = {s["key"]: s for s in load_samples(deployment.device, path)}
    out = []
    for i, v in enumerate(variants):
        if v.key in have:
            out.append(have[v.key])
            continue
        if not measure:
            continue
        t0 = time.perf_counter()
        try:
            s = collect_sample(v, deployment, **sample_kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed variant is skipped, not fatal
            log(f"[{i + 1}/{len(variants)}] {v.key}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            continue
        _append_sample(path, s)
        out.append(s)
        log(f"[{i + 1}/{len(variants)}] {v.key}: {s['e2e_ms']:.3f} ms (spread {100 * s['spread']:.1f}%), "
            f"{len(s['kernels'])} kernels, {time.perf_counter() - t0:.1f} s")
    if not measure:
        return out
    for session in range(2, sessions + 1):
        for i, s in enumerate(out):
            if s.get("sessions", 1) >= session:
                continue
            before = s["e2e_ms"]
            try:
                remeasure(s, deployment, **sample_kwargs)
            except Exception as exc:  # noqa: BLE001 - the first session's figures stand
                log(f"[session {session}, {i + 1}/{len(out)}] {s['key']}: FAILED {type(exc).__name__}: {exc}")
                continue
            _append_sample(path, s)  # the newer line wins on load
            log(f"[session {session}, {i + 1}/{len(out)}] {s['key']}: {before:.3f} -> {s['e2e_ms']:.3f} ms "
                f"(this session's fastest {s['e2e_again_ms']:.3f})")
    return out


# ---------------------------------------------------------------------------------- the model
@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Accuracy of network-latency predictions against measurements.

    Attributes:
        n: Networks evaluated.
        within_10: Share of networks whose prediction is within +-10% of the measured latency.
        rmse_ms: Root mean squared error in ms.
        mape: Mean absolute relative error.
        median_ape: Median absolute relative error.
        rows: ``(key, measured_ms, predicted_ms)`` per network.
    """

    n: int
    within_10: float
    rmse_ms: float
    mape: float
    median_ape: float
    rows: tuple[tuple[str, float, float], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "within_10": self.within_10, "rmse_ms": self.rmse_ms, "mape": self.mape,
                "median_ape": self.median_ape, "rows": [list(r) for r in self.rows]}

    def table(self) -> str:
        lines = [f"{'network':<72} {'measured':>9} {'predicted':>9} {'err':>7}"]
        for key, m, p in self.rows:
            lines.append(f"{key[:72]:<72} {m:>9.3f} {p:>9.3f} {100 * (p - m) / m:>+6.1f}%")
        lines.append(f"held-out networks: {self.n}; within +-10%: {100 * self.within_10:.1f}%; "
                     f"RMSE {self.rmse_ms:.3f} ms; mean |err| {100 * self.mape:.1f}%; "
                     f"median |err| {100 * self.median_ape:.1f}%")
        return "\n".join(lines)


def accuracy(measured: Sequence[float], predicted: Sequence[float], keys: Sequence[str] | None = None) -> Evaluation:
    """Share within +-10%, RMSE and relative errors of predictions against measurements."""
    m = np.asarray(measured, dtype=float)
    p = np.asarray(predicted, dtype=float)
    if m.size == 0:
        raise PredictorError("nothing to evaluate: no measured samples")
    ape = np.abs(p - m) / m
    keys = list(keys) if keys is not None else [str(i) for i in range(m.size)]
    return Evaluation(n=int(m.size), within_10=float(np.mean(ape <= 0.10)),
                      rmse_ms=float(np.sqrt(np.mean((p - m) ** 2))), mape=float(np.mean(ape)),
                      median_ape=float(np.median(ape)),
                      rows=tuple((k, float(a), float(b)) for k, a, b in zip(keys, m, p)))


_XGB_PARAMS = {"n_estimators": 300, "max_depth": 4, "learning_rate": 0.1, "subsample": 0.9,
               "colsample_bytree": 0.9, "min_child_weight": 1.0, "reg_lambda": 1.0, "n_jobs": 1}


def _kernel_rows(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Measured kernels of ``samples``: rows, the network index of each, and ms per call (the
    fastest of the instrumented runs: on a shared VM the slower runs are interference, and
    fitting on medians cost 10 points of held-out accuracy)."""
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
    import hashlib

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


_TARGETS = ("e2e_ms", "e2e_min_ms", "kernel_sum_ms")


class LatencyPredictor:
    """Kernel-level XGBoost latency model of one device (and tuning state).

    Args:
        device: Device name the samples were measured on.
        tuning_state: What builds the samples describe (``"untuned"``).
        target: Which measured latency it predicts: ``"e2e_ms"``, the oracle's standard
            protocol (median of repeats); ``"e2e_min_ms"``, the fastest repeat; or
            ``"kernel_sum_ms"``, the sum of each kernel's fastest in-graph time, which
            approximates the network's cost when no other process competes for the cores
            (on a shared machine the end-to-end figures swing by up to 2x between runs).
    """

    def __init__(self, device: str = "host", *, tuning_state: str = TUNING_STATE, target: str = "e2e_ms"):
        if target not in _TARGETS:
            raise PredictorError(f"target must be one of {', '.join(_TARGETS)}, got {target!r}")
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
    def fit(self, samples: Sequence[dict[str, Any]], *, folds: int = 4, seed: int = 0) -> "LatencyPredictor":
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
                                 f"LatencyPredictor.load({self.device!r})")

    def _booster(self):
        if self._booster_cache is None or self._booster_cache[0] is not self.model:
            self._booster_cache = (self.model, self.model.trees.get_booster())
        return self._booster_cache[1]

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
        return self.predict_features(kernel_features(prepared))

    def predict(self, model: Any, deployment: Any = None, example_inputs: Any = None) -> float:
        """Predicted latency in ms of ``model`` on the deployment's device.

        Lowers and prepares the model (about 1-5 s, mostly torch.export; no LLVM build), then
        predicts from its kernels. Results are cached per (structural hash, input shapes).

        Raises:
            PredictorError: The deployment's device or precision is not the predictor's.
        """
        from omnic.core.deployment import Deployment
        from omnic.core.ir import TracedModel, trace

        deployment = Deployment.coerce(deployment if deployment is not None else self.device)
        if deployment.device != self.device:
            raise PredictorError(f"this predictor is for {self.device!r}, not {deployment.device!r}; "
                                 f"load LatencyPredictor.load({deployment.device!r})")
        traced = model if isinstance(model, TracedModel) and example_inputs is None else trace(model, example_inputs)
        key = (traced.structural_hash, json.dumps([list(s) for s in traced.input_shapes]) + deployment.precision)
        if key not in self._cache:
            prepared, _, _ = _prepare(traced, deployment)
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
        pat = re.compile(rf"^{re.escape(_safe(device))}-v(\d+)\.json$")
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
        base = predictors_dir() / f"{_safe(self.device)}-v{version}"
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
    def load(cls, device: str = "host", version: int | None = None) -> "LatencyPredictor":
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
        base = predictors_dir() / f"{_safe(device)}-v{version}"
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


# ---------------------------------------------------------------------------------------- CLI
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fit_variants(n: int) -> list[Variant]:
    return sample_variants(n, seed=FIT_SEED)


def eval_variants(n: int, fit_n: int) -> list[Variant]:
    return sample_variants(n, seed=EVAL_SEED, exclude=[v.key for v in fit_variants(max(fit_n, 200))])


def cmd_fit(args) -> int:
    from omnic.cli.common import deployment_from

    deployment = deployment_from(args)
    samples = collect(fit_variants(args.samples), deployment, log=_log, sessions=args.sessions)
    pred = LatencyPredictor(deployment.device, target=args.target).fit(samples)
    path = pred.save()
    print(f"fitted {deployment.device} predictor v{pred.version} on {len(samples)} networks "
          f"({pred.info['n_kernel_samples']} kernel samples); saved {path}")
    return 0


def cmd_eval(args) -> int:
    from omnic.cli.common import deployment_from

    deployment = deployment_from(args)
    pred = LatencyPredictor.load(deployment.device, args.version)
    fit_n = len(pred.info.get("train", {}).get("variants", [])) or 200
    held = [v for v in eval_variants(args.samples, fit_n)
            if v.key not in set(pred.info.get("train", {}).get("variants", []))]
    samples = collect(held, deployment, log=_log, measure=not args.stored_only, sessions=args.sessions)
    ev = pred.evaluate(samples)
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < 0.5:
        pred._memo.clear()  # cold: every kernel is new to the predictor, the worst case
        pred.predict_many([s["kernels"] for s in samples])
        reps += 1
    rate = reps * len(samples) / (time.perf_counter() - t0)
    data = dict(ev.to_dict(), device=deployment.device, version=pred.version, target=pred.target,
                predictions_per_s=rate)
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print(ev.table())
        print(f"predictor {deployment.device} v{pred.version} (target {pred.target}): "
              f"{rate:.0f} network predictions/s from features (cold)")
    return 0


def cmd_collect(args) -> int:
    from omnic.cli.common import deployment_from

    deployment = deployment_from(args)
    variants = fit_variants(args.samples) if args.set == "fit" else eval_variants(args.samples, 200)
    samples = collect(variants, deployment, log=_log, sessions=args.sessions)
    print(f"{len(samples)} samples for {deployment.device} in {samples_path(deployment.device)}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``omnic predictor fit|eval|collect``."""
    p = subparsers.add_parser("predictor", help="kernel-level latency predictor per device")
    sub = p.add_subparsers(dest="predictor_command", required=True)

    def common(q):
        q.add_argument("--device", default="host")
        q.add_argument("--precision", default="fp32")
        q.add_argument("--threads", type=int)
        q.add_argument("--sessions", type=int, default=2,
                       help="measurement sessions per network, minutes apart; each figure keeps its fastest")

    q = sub.add_parser("fit", help="measure zoo variants (untuned) and fit a new predictor version")
    common(q)
    q.add_argument("--samples", type=int, default=56, help="number of zoo variants to fit on")
    q.add_argument("--target", choices=_TARGETS, default="e2e_ms",
                   help="what to predict: e2e_ms (default; the measured end-to-end latency, the fastest of the "
                        "oracle's measurements over the sessions), kernel_sum_ms (sum of in-graph kernel times) "
                        "or e2e_min_ms (fastest single repeat)")
    q.set_defaults(func=cmd_fit)
    q = sub.add_parser("eval", help="accuracy on held-out zoo variants (within +-10%%, RMSE)")
    common(q)
    q.add_argument("--samples", type=int, default=20, help="number of held-out variants")
    q.add_argument("--stored-only", action="store_true", help="evaluate only held-out variants already measured")
    q.add_argument("--version", type=int, help="predictor version (default: newest)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval)
    q = sub.add_parser("collect", help="only measure samples (fit or held-out set)")
    common(q)
    q.add_argument("--samples", type=int, default=48)
    q.add_argument("--set", choices=("fit", "eval"), default="fit")
    q.set_defaults(func=cmd_collect)
