"""`Oracle.measure(graph, deployment)`: exact compiled latency, looked up before it is measured.

The oracle does not know how to compile: the compile function is injected at construction
(``engine.default_oracle()`` wires ``engine.compile``), so the oracle depends on nothing above it.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import tempfile
import threading
from typing import Any, Callable, Sequence

from omnic.compile import stack_align
from omnic.compile.bisect import mismatch_error
from omnic.compile.check import output_error, tolerance
from omnic.compile.pipeline import PIPELINE_REVISION
from omnic.compile.rules.cpu import RULES_REVISION
from omnic.compile.target import host_cpu_name, tvm_target
from omnic.compile.tuning.config import current as tuning_config
from omnic.compile.tuning.database import database_dir, state_digest
from omnic.core.cache import cache_root
from omnic.core.deployment import Deployment
from omnic.core.errors import (DeviceUnreachableError, LeaseTimeoutError, OutputMismatchError,
                               ServerConnectError, UnsupportedOperatorError, describe)
from omnic.core.ir import TracedModel, trace
from omnic.core.measure import PROTOCOL_REVISION, CompileFn, MeasureConfig, Measurement
from omnic.oracle.store import LatencyStore, StoreKey
from omnic.remote.session import export_for_upload
from omnic.remote.tracker import require_servers
from omnic.remote.batch import BatchConfig, FarmBatch, count_servers

#: Unreachable-device errors that belong to one measurement, not to the device: a lease that timed
#: out or a server that died is recorded as that candidate's failure (a later ask measures again).
_CANDIDATE_FAULTS = (LeaseTimeoutError, ServerConnectError)

#: What a farm batch records instead of an output check: its servers run the candidates, and their
#: outputs are not fetched back to compare.
_REMOTE_UNCHECKED = "measured by a remote batch: outputs not compared with PyTorch"


def _checkable(deployment: Deployment) -> bool:
    """Whether this process can compare the deployment's outputs with PyTorch's (a local device)."""
    return deployment.spec.local and not deployment.is_remote


def _answers(cached: Measurement | None, deployment: Deployment, check: bool) -> bool:
    """Whether a stored row answers a request without a build.

    A latency answers an unchecked request, and a checked one when its build was checked (or
    cannot be: a remote device). A checked build that was refused (a wrong program) answers a
    checked request too: it is refused again from the store, so searches skip it at once. The
    key holds the pipeline revision, so a fixed lowering (which bumps it) checks afresh.
    """
    if cached is None:
        return False
    if cached.ok:
        return not check or cached.checked is True or not _checkable(deployment)
    return check and cached.checked is True


def _check_record(dm: Any, deployment: Deployment) -> tuple[bool, dict[str, Any]]:
    """``(checked, extra)`` for a build ``compile_fn`` returned: checked when its report carries the
    output difference to PyTorch (``engine.compile`` sets it only after the check passed)."""
    report = getattr(dm, "report", None)
    readable = report is not None and hasattr(report, "get")
    error = report.get("max_rel_error") if readable else None
    # what the build was, so a stored row says which kernels its latency is of
    build = {k: report.get(k) for k in ("build_fingerprint", "schedules") if report.get(k)} if readable else {}
    if error is not None:
        return True, {"checked": True, "max_rel_error": float(error), **build}
    return False, {"checked": False, **build}


def _check_remote(dm: Any, traced: TracedModel, deployment: Deployment) -> tuple[bool, dict[str, Any]]:
    """Run a remote build once on its leased server (the lease the measurement then uses) and
    compare with PyTorch here: ``engine.compile`` cannot, it takes no lease.

    Raises:
        OutputMismatchError: The outputs differ beyond the precision's tolerance (naming the
            suspect ops: prefixes are not bisected on a remote device).
    """
    error, tol = output_error(dm, traced), tolerance(deployment.precision)
    if not error <= tol:
        raise mismatch_error(traced, error, tolerance=tol, precision=deployment.precision,
                             device=deployment.device, run_prefix=None)
    return True, {"checked": True, "max_rel_error": float(error), "checked_on": "remote"}


def _tunes(deployment: Deployment) -> bool:
    """Whether a compile for ``deployment`` tunes first (it has a tuning budget)."""
    return deployment.tuning_trials > 0 or bool(deployment.tuning_time_s)


def _database_state(deployment: Deployment) -> str:
    """The digest of the device's tuning database as it is now (what a build would apply)."""
    return state_digest(database_dir(deployment, _target(deployment.device, deployment.threads)))


@functools.lru_cache(maxsize=64)
def _target(device: str, threads: int | None) -> Any:
    return tvm_target(Deployment.coerce(device).spec, num_threads=threads)


def _built_state(dm: Any) -> str | None:
    """The database digest a build reported (None from a compile function that does not say)."""
    report = getattr(dm, "report", None)
    state = report.get("database_state") if report is not None and hasattr(report, "get") else None
    return str(state) if state else None


def _release(dm: Any, deployment: Deployment, *, ran_remotely: bool) -> None:
    """Give a remote build's leased server back to the farm now, not at garbage collection."""
    if deployment.is_remote:
        dm.runtime.close()
        if ran_remotely:
            # calling a remote DeviceModel (dm(x)) leaves a reference cycle that holds the RPC
            # session, so close() alone frees the server only at the next GC
            gc.collect()


class Oracle:
    """The exact latency oracle for all devices.

    Args:
        store: Where measurements are kept (default: ``<cache>/latency.sqlite``).
        config: The measurement protocol.
        compile_fn: Builds a candidate for a deployment (``engine.compile`` or anything with its
            signature). Keyword-only and required: a forgotten wiring fails here, not as a failed
            measurement recorded in the store.
    """

    def __init__(self, store: LatencyStore | None = None, config: MeasureConfig | None = None, *,
                 compile_fn: CompileFn):
        # not `store or ...`: an empty store has len() 0 and is falsy
        self.store = store if store is not None else LatencyStore(cache_root() / "latency.sqlite")
        self.config = config or MeasureConfig()
        self.compile_fn = compile_fn
        self.fresh_measurements = 0
        self.last_batch_stats: dict[str, Any] = {}  # of the last remote measure_many

    def key(self, traced: TracedModel, deployment: Deployment, *, database_state: str | None = None) -> StoreKey:
        """The store key of ``traced``'s build for ``deployment``.

        The build is a function of the model, the deployment (tuning budget included), the
        compiler's revisions and the content of the device's tuning database, so the key holds
        all of them: a stored latency answers only for the build a compile would make now.
        ``database_state`` is the digest a build reported; default: the database's current one.
        """
        state = database_state if database_state is not None else _database_state(deployment)
        context = (f"threads={deployment.threads or 'default'};trials={deployment.tuning_trials}"
                   f";time_s={deployment.tuning_time_s or 0};db={state};rules={RULES_REVISION}"
                   f";pipeline={PIPELINE_REVISION};protocol={PROTOCOL_REVISION}")
        if not stack_align.enabled():  # an A/B build without aligned stacks is a different binary
            context += ";unaligned_stack"
        if not tuning_config().time_defaults:  # every record replayed, none judged against the defaults
            context += ";records=unjudged"
        if deployment.spec.target is None and not deployment.is_remote:
            # `host` is whatever CPU runs this process, and a cache directory can outlive the CPU
            # (a VM moved to another host, a shared home): a Zen 4's latency says nothing of a Zen 5
            context += f";cpu={host_cpu_name()}"
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
                config: MeasureConfig | None = None, check: bool = True) -> Measurement:
        """Exact latency of ``model`` on the deployment's device (a stored value when there is one).

        Failures come back as a Measurement with ``error`` set, not as exceptions, so a batch of
        candidates is never lost to one bad one.

        Args:
            model: ``nn.Module``, GraphModule or :class:`TracedModel`.
            deployment: ``Deployment`` or the equivalent dict.
            example_inputs: Inputs for a model that is not traced yet.
            config: The measurement protocol (default: the oracle's).
            check: Compile with the output check (``compile_fn(..., check=True)``): a build whose
                outputs differ from PyTorch's is never measured; its failure is stored (extra
                ``{"checked": true, "mismatch": true}``) and answers later checked requests. The
                check runs once per key: the row records ``"checked"`` and its ``max_rel_error``.
                A stored unchecked latency does not answer a checked request; the build is then
                checked, and the stored value kept (same build) or replaced by the refusal.
                On a remote device the build is run once on the leased server and compared here
                (``extra["checked_on"] = "remote"``); :meth:`measure_many`'s farm batches record
                theirs unchecked (``extra["unchecked"]`` says why), and on a remote device a
                stored latency answers either way (its outputs cannot be compared from the store).

        Raises:
            UnsupportedOperatorError: The model holds an operator the compiler cannot lower (it
                names the operator and the workaround; nothing is stored).
            DeviceUnreachableError: No device to measure on.
        """
        deployment = Deployment.coerce(deployment)
        traced = model if isinstance(model, TracedModel) else trace(model, example_inputs)
        # With a tuning budget the build is what the database holds *after* tuning, as in
        # compile: tune (build) first, then look up. Without one, the current state decides.
        key = None if _tunes(deployment) else self.key(traced, deployment)
        cached = self.store.get(key) if key is not None else None
        if _answers(cached, deployment, check):
            return cached
        if deployment.is_remote:
            # Before compiling: a key no server has fails now (NoServerError), not after a build
            # and the whole lease timeout, and nothing about the candidate is stored.
            require_servers(deployment.tracker, deployment.rpc_key)
        extra: dict[str, Any] = {}
        try:
            dm = self.compile_fn(traced, deployment, check=check, progress=False)
            built_key = self.key(traced, deployment, database_state=_built_state(dm))
            if built_key != key:  # tuned just now, or the database changed since the lookup
                key, cached = built_key, self.store.get(built_key)
                if _answers(cached, deployment, check):
                    _release(dm, deployment, ran_remotely=False)
                    return cached
            ran_remotely = False
            try:
                checked, extra = _check_record(dm, deployment)
                if check and not checked and deployment.is_remote:
                    ran_remotely = True
                    checked, extra = _check_remote(dm, traced, deployment)
                if cached is not None and cached.ok and checked:
                    # the stored value was measured on this very build, unchecked: keep it, now checked
                    self.store.put(key, cached, extra)
                    return dataclasses.replace(cached, checked=True)
                measurement = dataclasses.replace(dm.measure(config or self.config), checked=checked)
            finally:
                _release(dm, deployment, ran_remotely=ran_remotely)
        except OutputMismatchError as exc:  # a wrong program: its failure is stored, never a latency
            key = key if key is not None else self.key(traced, deployment)
            measurement = Measurement(median_ms=None, error=describe(exc), device=deployment.device, checked=True)
            extra = {"checked": True, "mismatch": True, "max_rel_error": exc.max_rel_error, "node": exc.node}
        except Exception as exc:  # noqa: BLE001 - a failed candidate is data
            if key is None:  # the build failed before it said what it was: key it by the state now
                key = self.key(traced, deployment)
            if isinstance(exc, DeviceUnreachableError) and not isinstance(exc, _CANDIDATE_FAULTS):
                raise  # no device to measure on: nothing about the candidate to record
            if isinstance(exc, UnsupportedOperatorError):
                # the model, not the measurement, is at fault: every retry fails the same way, and the
                # user needs the operator and the workaround, not a generic MeasurementError
                raise
            measurement = Measurement(median_ms=None, error=describe(exc), device=deployment.device)
            extra = {}
        self.store.put(key, measurement, extra)
        self.fresh_measurements += 1
        return measurement

    def measure_many(self, models: Sequence[Any], deployment: Any, example_inputs: Any = None, *,
                     config: MeasureConfig | None = None, batch: BatchConfig | None = None,
                     on_result: Callable[[int, Measurement], None] | None = None,
                     check: bool = True) -> list[Measurement]:
        """Exact latency of many candidates; on a remote deployment, in parallel over the farm.

        With a tracker, every server registered under the deployment's key measures at once (one
        lease per server at a time) while candidates compile here; each result is stored the moment
        it arrives. A server killed mid-measurement gets its candidate retried elsewhere (bounded,
        with backoff); a candidate that runs past ``batch.timeout_s`` is marked failed with the
        reason; the batch always completes. Stored values are reused, and identical candidates
        (same structural hash and shapes) are measured once. Without a tracker, the candidates
        are measured one after the other on this machine.

        Args:
            models: ``nn.Module``\s, GraphModules or :class:`TracedModel`\s.
            deployment: ``Deployment`` or the equivalent dict.
            example_inputs: Inputs for the models that are not traced yet.
            config: The measurement protocol (default: the oracle's).
            batch: Timeouts, retries and workers (:class:`omnic.remote.batch.BatchConfig`).
            on_result: ``(index, Measurement)`` called as each candidate finishes.
            check: As for :meth:`measure` (searches leave it on: a wrong candidate fails and is skipped).

        Returns:
            One Measurement per model, in order (failed ones have ``error`` set).

        Raises:
            DeviceUnreachableError: The tracker is unreachable or has no server under the key
                (raised before anything is measured).
        """
        deployment = Deployment.coerce(deployment)
        cfg = config or self.config
        traced = [m if isinstance(m, TracedModel) else trace(m, example_inputs) for m in models]
        results: list[Measurement | None] = [None] * len(traced)
        groups: dict[StoreKey, list[int]] = {}
        for i, t in enumerate(traced):
            key = self.key(t, deployment)
            # with a tuning budget, a stored value answers only after tuning (measure does that)
            cached = None if _tunes(deployment) else self.store.get(key)
            if _answers(cached, deployment, check):
                results[i] = cached
                if on_result is not None:
                    on_result(i, cached)
            else:
                groups.setdefault(key, []).append(i)
        if not groups:
            return results  # type: ignore[return-value]
        if not deployment.is_remote:
            for indices in groups.values():
                m = self.measure(traced[indices[0]], deployment, config=cfg, check=check)
                for i in indices:
                    results[i] = m
                    if on_result is not None:
                        on_result(i, m)
            return results  # type: ignore[return-value]

        batch = batch or BatchConfig()
        servers = count_servers(deployment, batch)  # NoServerError at once on a key nobody serves
        todo = list(groups.items())
        lock = threading.Lock()
        built_keys: dict[int, StoreKey] = {}  # the key of the build each candidate got
        with tempfile.TemporaryDirectory(prefix="omnic-batch-") as tmp:
            def prepare(j: int):
                t = traced[todo[j][1][0]]
                dm = self.compile_fn(t, deployment, check=check, progress=False)
                built_keys[j] = self.key(t, deployment, database_state=_built_state(dm))
                return export_for_upload(dm.executable, deployment, tmp), dm.input_shapes, dm.input_dtypes

            def store(j: int, m: Measurement, extra: dict[str, Any]) -> None:
                key, indices = todo[j]
                key = built_keys.get(j, key)
                if m.ok:  # measured on the farm: the outputs were not compared here
                    m = dataclasses.replace(m, checked=False)
                    extra = {**(extra or {}), "checked": False, "unchecked": _REMOTE_UNCHECKED}
                self.store.put(key, m, extra)  # at once: a later fault cannot lose it
                with lock:
                    self.fresh_measurements += 1
                    for i in indices:
                        results[i] = m
                if on_result is not None:
                    for i in indices:
                        on_result(i, m)

            run = FarmBatch(deployment, len(todo), prepare=prepare, on_result=store, config=cfg, batch=batch)
            run.run(min(batch.workers or servers, len(todo)))
        self.last_batch_stats = dict(run.stats, servers=servers)
        return results  # type: ignore[return-value]
