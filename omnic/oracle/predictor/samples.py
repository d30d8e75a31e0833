"""Samples for the latency predictor: zoo variants compiled untuned, measured, stored.

A sample is one measured network: its kernels' features (:mod:`omnic.compile.features`) and
per-call times, and its end-to-end latency under the oracle's protocol. Samples are appended to
``<cache>/predictors/samples-<device>.jsonl`` (one per line; the last line of a variant wins) and
each variant's compiled library is kept beside them, so a later session measures it again without
a rebuild.

Libraries are dlopened, so they are code run from the cache: each one's sha256 is recorded beside
it (``<library>.so.sha256``) when omnic writes it, and checked before it is loaded. A library whose
hash is missing or differs is never loaded: it is rebuilt from the sample's variant, or refused with
a :class:`~omnic.core.errors.PredictorError` when it cannot be (see :mod:`omnic.core.cache` for the
cache's trust model).

Tuning state: samples describe the code ``engine.compile`` builds for a deployment with *no tuning
database applied* (``build.build(prepared, spec, target, None)``). Tuned kernels run at a
different speed; a predictor for a tuned device needs samples collected from tuned builds, which
is why each sample and saved predictor records ``tuning_state``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnic.compile import build, features
from omnic.compile.profiler import instrumented_runs
from omnic.compile.runtime import LocalRuntime
from omnic.core.cache import cache_root, check_private, make_dir
from omnic.core.deployment import Deployment
from omnic.core.errors import PredictorError, describe
from omnic.core.ir import trace
from omnic.core.measure import MeasureConfig, time_vm
from omnic.core.quiet import native_stderr_filtered
from omnic.examples.variants import Variant

#: Bumped whenever the meaning of a feature changes; samples with another version are re-collected.
SCHEMA_VERSION = 4  # 2: loop-nest work terms, MobileNetV2 kernels and depths; 3: e2e = fastest of
#: passes; 4: measurement sessions from a saved library
TUNING_STATE = "untuned"


def predictors_dir() -> Path:
    """``<cache>/predictors``: samples, their compiled libraries and saved predictors."""
    path = cache_root() / "predictors"
    make_dir(path)
    return path


def file_stem(device: str) -> str:
    """``device`` as a file-name part (the stored files are named with it)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device)


def samples_path(device: str) -> Path:
    return predictors_dir() / f"samples-{file_stem(device)}.jsonl"


def collect_sample(variant: Any, deployment: Any = "host", *, runs: int = 15,
                   config: Any = None, passes: int = 4) -> dict[str, Any]:
    """Compile a variant untuned, save its library and measure it once (:func:`_measure_session`).

    Args:
        variant: The architecture to measure (an :class:`omnic.examples.variants.Variant`).
        deployment: A local deployment (device, precision, threads).
        runs: Instrumented runs per kernel round.
        config: End-to-end protocol (default :class:`omnic.core.measure.MeasureConfig()`, the
            oracle's); tests pass a cheaper one.
        passes: End-to-end measurements per session (at least 2).

    Returns:
        A JSON-friendly sample (see :func:`load_samples`).
    """
    deployment = Deployment.coerce(deployment)
    if not deployment.spec.local or deployment.is_remote:
        raise PredictorError(f"collecting samples needs a local device; {deployment.device!r} is not this machine")
    t0 = time.perf_counter()
    model, x = variant.build()
    traced = trace(model, x)
    prepared, spec, target = features.prepare(traced, deployment)
    kernels = features.kernel_features(prepared)
    t1 = time.perf_counter()
    executable, _ = build.build(prepared, spec, target, None)
    library = _library_path(deployment.device, variant.key)
    _save_library(executable, library)  # a later session re-measures it without rebuilding
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
    folder = predictors_dir() / f"libs-{file_stem(device)}"
    make_dir(folder)
    return folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.so"


def _hash_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(library: Path) -> str | None:
    """The sha256 recorded when omnic saved ``library``, or None (none recorded, or unreadable)."""
    try:
        text = _hash_path(library).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def _save_library(executable: Any, library: Path) -> None:
    """Export ``executable`` to ``library`` and record its sha256 beside it (written last and
    atomically: a library saved halfway has no hash, so it is rebuilt, never loaded)."""
    _hash_path(library).unlink(missing_ok=True)
    with native_stderr_filtered():  # TVM's "Scope Saving" lines
        executable.export_library(str(library))
    tmp = library.with_name(library.name + ".sha256.tmp")
    tmp.write_text(_sha256(library) + "\n")
    os.replace(tmp, _hash_path(library))


def _trusted_library(sample: dict[str, Any], deployment: Deployment) -> Any:
    """``sample``'s saved library, loaded only if its sha256 is the recorded one; otherwise rebuilt
    from the sample's variant (and saved again) without loading the file that was there.

    Raises:
        PredictorError: The library fails its check and the sample cannot be rebuilt.
        CacheError: The libraries' folder is writable by others.
    """
    library = _library_path(deployment.device, sample["key"])
    check_private(library.parent)  # a folder others can write: the hash beside a file proves nothing
    recorded = recorded_sha256(library)
    if library.exists() and recorded is not None and _sha256(library) == recorded:
        return features.load_library(library)
    why = ("is missing" if not library.exists() else "has no recorded sha256" if recorded is None
           else "does not match the sha256 recorded when it was saved")
    try:
        model, x = Variant.from_dict(sample["variant"]).build()
        traced = trace(model, x)
    except Exception as exc:  # noqa: BLE001 - whatever the sample holds, the answer is the same
        raise PredictorError(f"the saved library {library} {why}, so it was not loaded, and it cannot be "
                             f"rebuilt from its sample ({describe(exc)}); collect it again") from exc
    if traced.structural_hash != sample.get("structural_hash"):
        raise PredictorError(f"the saved library {library} {why}, so it was not loaded, and its variant "
                             f"{sample['key']} now builds another network; collect it again")
    prepared, spec, target = features.prepare(traced, deployment)
    executable, _ = build.build(prepared, spec, target, None)
    _save_library(executable, library)
    return executable


def _measure_session(sample: dict[str, Any], executable: Any, deployment: Any, *, runs: int, config: Any,
                     passes: int) -> None:
    """Measure ``sample``'s network once more (a *session*) and fold the result into it.

    A session is ``passes`` end-to-end measurements with the oracle's protocol, each on a fresh
    VM, interleaved with two rounds of instrumented kernel runs, so that they spread over
    several seconds. Across sessions every figure keeps its fastest value: a shared machine's speed
    swings for seconds at a time, and slow moments are the only noise there is, so the fastest of
    measurements spread in time is what the device itself does.

    Fields: ``e2e_ms`` (the fastest measurement of all sessions), ``e2e_first_ms`` (the very
    first, what a single oracle call sees), ``e2e_early_ms`` / ``e2e_again_ms`` (the fastest of
    the first session and of the last one; with one session, of its first and second half: two
    independent estimates whose agreement is the noise floor of the ground truth). Per kernel:
    the fastest of the instrumented runs minus the hook's own cost per call, estimated as the
    cheapest per-call time of a VM builtin (e.g. ``null_value``), which does no work.
    """
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
    # a kernel of the prepared module that the build folded away (an op on constants only, folded
    # with the weight re-layouts) never runs: it costs nothing and is no sample of a kernel's time
    folded = [k["name"] for k in sample["kernels"]
              if k["name"] not in rows and f"{k['name']}_prepacked" not in rows]
    if folded:
        sample["kernels"] = [k for k in sample["kernels"] if k["name"] not in folded]
        sample["folded_kernels"] = sorted(set(sample.get("folded_kernels", [])) | set(folded))
    for k in sample["kernels"]:
        # a kernel whose weight re-layout the build split out and folded runs as "<name>_prepacked"
        r = rows.get(k["name"]) or rows.get(f"{k['name']}_prepacked")
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

    The library is loaded only if its sha256 is the one recorded when it was saved; a missing,
    unrecorded or changed library is rebuilt from the sample's variant instead (untuned, as it was
    collected) and saved again.

    Raises:
        PredictorError: The sample predates library caching, or its library fails the check and
            cannot be rebuilt.
        CacheError: The libraries' folder is writable by others.
    """
    deployment = Deployment.coerce(deployment)
    if "input_shapes" not in sample:
        raise PredictorError(f"no saved library for {sample['key']}; collect it again")
    _measure_session(sample, _trusted_library(sample, deployment), deployment, runs=runs, config=config,
                     passes=passes)
    return sample


def _kernel_times(vm, inputs: Sequence[Any], *, runs: int) -> dict[str, dict[str, Any]]:
    """Per VM call target: calls per run and the median and minimum over runs of its total ms.

    Contention from other processes only ever adds time, so the fastest run is the best
    estimate of the kernel's own cost on a shared machine.
    """
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


def collect(variants: Sequence[Any], deployment: Any = "host", *, path: Path | None = None,
            log=print, measure: bool = True, sessions: int = 1, **sample_kwargs: Any) -> list[dict[str, Any]]:
    """Samples for ``variants``: stored ones are reused, the rest measured and appended.

    A failing variant is logged and skipped, so one bad architecture does not lose a batch.
    With ``measure=False`` only stored samples are returned. With ``sessions`` > 1, every sample
    with fewer measurement sessions is measured again after the whole set (minutes later, from
    its saved library), and keeps its fastest figures (:func:`_measure_session`). ``sample_kwargs``
    go to :func:`collect_sample`.
    """
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
            log(f"[{i + 1}/{len(variants)}] {v.key}: FAILED {describe(exc)}")
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
                log(f"[session {session}, {i + 1}/{len(out)}] {s['key']}: FAILED {describe(exc)}")
                continue
            _append_sample(path, s)  # the newer line wins on load
            log(f"[session {session}, {i + 1}/{len(out)}] {s['key']}: {before:.3f} -> {s['e2e_ms']:.3f} ms "
                f"(this session's fastest {s['e2e_again_ms']:.3f})")
    return out
