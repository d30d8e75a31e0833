"""Measure a batch of candidates on a farm of devices behind one tracker key, in parallel.

One worker thread per server registered under the key; each worker leases a server from the
tracker for one candidate at a time (so the tracker stays the only scheduler, and other clients
of the farm interleave fairly), uploads the candidate's library, times it and gives the server
back. Candidates are compiled here on a producer thread while the devices measure.

Faults are data, not crashes:

- a server that dies mid-measurement (connection lost, load failure) -> the candidate goes back
  in the queue after a backoff and is retried on whichever server the tracker hands out next,
  at most ``max_retries`` times;
- a candidate that runs longer than ``timeout_s`` -> the server ends the session (TVM's own
  session timeout kills the process running it) and the candidate is marked failed with that
  reason; it is not retried, a hang is a property of the candidate. A server that stops
  answering altogether is abandoned by the client after ``timeout_s + grace_s``;
- every result (success or failure) is handed to ``on_result`` as soon as it exists, so the
  caller stores it at once and nothing finished is lost when a later candidate fails.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from omnic.core.deployment import Deployment
from omnic.core.errors import DeviceUnreachableError, LeaseTimeoutError, ServerConnectError, describe
from omnic.core.measure import MeasureConfig, Measurement, time_vm
from omnic.remote.session import load_remote_vm, random_tensors, server_load
from omnic.remote.tracker import RpcConfig, TrackerClient, require_servers


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How a farm batch treats time and faults.

    Attributes:
        timeout_s: Per candidate on the device (upload, load and timing); the server ends the
            session after this long and the candidate is marked failed.
        max_retries: Retries of a candidate whose server failed (not of a timed-out one).
        backoff_s: Wait before the first retry; doubled for each further one.
        lease_timeout_s: A worker that cannot lease a server for this long retires; when all
            have, the remaining candidates are marked failed with the reason.
        connect_timeout_s: Bound on reaching the tracker.
        grace_s: Extra client-side wait beyond ``timeout_s`` before a silent server is abandoned.
        workers: Concurrent leases (default: the servers registered under the key).
    """

    timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 1.0
    lease_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    grace_s: float = 15.0
    workers: int | None = None


class _CandidateTimeout(Exception):
    """The candidate ran past its timeout on the device."""


@dataclass(eq=False)
class _Job:
    index: int
    library: Path | None = None
    attempts: int = 0
    not_before: float = 0.0
    errors: list[str] = field(default_factory=list)
    done: bool = False
    deadline: float | None = None  # client-side: past it, the server is deemed unresponsive
    server: str | None = None
    worker: int | None = None


def measure_on_server(session: Any, library: Path, deployment: Deployment, input_shapes: Sequence[tuple],
                      input_dtypes: Sequence[str], config: MeasureConfig, *, server: str = "") -> Measurement:
    """Upload ``library`` to a leased session and time it with the shared protocol.

    ``server`` (``"host:port"``) only labels the call (tests inject faults by it).
    """
    vm, dev, _ = load_remote_vm(session, library, deployment)
    inputs = random_tensors(list(zip(input_shapes, input_dtypes)), dev, np.random.default_rng(0))
    return time_vm(vm, dev, inputs, config, device_name=deployment.device, load_fn=lambda: server_load(session))


class FarmBatch:
    """One batch run (see the module docstring).

    Args:
        deployment: A remote deployment.
        count: Number of candidates (indices ``0..count-1``).
        prepare: ``index -> (library path, input shapes, input dtypes)``; runs on the producer
            thread; an exception marks that candidate failed (a compile error is data too).
        on_result: ``(index, Measurement, extra)`` called once per candidate, as it finishes,
            from whichever thread finished it.
        config: The measurement protocol.
        batch: Timeouts, retries, workers.
    """

    def __init__(self, deployment: Deployment, count: int, *,
                 prepare: Callable[[int], tuple[Path, Sequence[tuple], Sequence[str]]],
                 on_result: Callable[[int, Measurement, dict[str, Any]], None],
                 config: MeasureConfig, batch: BatchConfig):
        self.deployment = deployment
        self.jobs = [_Job(i) for i in range(count)]
        self.prepare = prepare
        self.on_result = on_result
        self.config = config
        self.batch = batch
        self._cond = threading.Condition()
        self._ready: list[_Job] = []
        self._signatures: dict[int, tuple[Sequence[tuple], Sequence[str]]] = {}
        self._remaining = count
        self._workers: dict[int, threading.Thread] = {}
        self._retired_reason: str | None = None
        self._next_worker = 0
        self._stop = False
        self.stats = {"leases": 0, "retries": 0, "timeouts": 0, "abandoned": 0, "failed": 0, "workers": 0}

    # ----------------------------------------------------------------------------- results
    def _resolve(self, job: _Job, m: Measurement, extra: dict[str, Any]) -> None:
        with self._cond:
            if job.done:  # an abandoned worker answering late
                return
            job.done = True
            job.deadline = None
            if not m.ok:
                self.stats["failed"] += 1
        extra = dict(extra, attempts=job.attempts + (1 if m.ok else 0), errors=list(job.errors))
        try:
            self.on_result(job.index, m, extra)
        finally:
            # Counted only once stored, so run() cannot return before the last result is kept.
            with self._cond:
                self._remaining -= 1
                self._cond.notify_all()

    def _fail(self, job: _Job, reason: str, **extra: Any) -> None:
        self._resolve(job, Measurement(median_ms=None, error=reason, device=self.deployment.device), extra)

    # ---------------------------------------------------------------------------- producer
    def _produce(self) -> None:
        for job in self.jobs:
            with self._cond:
                if self._stop:
                    return
            try:
                library, shapes, dtypes = self.prepare(job.index)
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is data
                self._fail(job, describe(exc), stage="compile")
                continue
            with self._cond:
                job.library = library
                self._signatures[job.index] = (shapes, dtypes)
                self._ready.append(job)
                self._cond.notify_all()

    # ----------------------------------------------------------------------------- workers
    def _take(self, wid: int) -> _Job | None:
        with self._cond:
            while True:
                if self._remaining == 0 or self._stop or wid not in self._workers:
                    return None
                now = time.monotonic()
                for job in self._ready:
                    if job.not_before <= now and not job.done:
                        self._ready.remove(job)
                        # Leasing is bounded by lease_timeout_s (socket timeout), connecting and
                        # running by the server's session timeout; the grace covers the rest.
                        b = self.batch
                        job.deadline = now + b.lease_timeout_s + b.timeout_s + b.grace_s
                        job.worker = wid
                        return job
                waits = [j.not_before - now for j in self._ready if not j.done]
                self._cond.wait(timeout=min([0.5] + [max(0.01, w) for w in waits]))

    def _requeue(self, job: _Job, delay: float) -> None:
        with self._cond:
            if job.done:
                return
            job.deadline = None
            job.not_before = time.monotonic() + delay
            self._ready.append(job)
            self._cond.notify_all()

    def _work(self, wid: int) -> None:
        b = self.batch
        client: TrackerClient | None = None
        try:
            while True:
                job = self._take(wid)
                if job is None:
                    return
                try:
                    if client is None:
                        client = TrackerClient(self.deployment.tracker, RpcConfig(
                            connect_timeout_s=b.connect_timeout_s, lease_timeout_s=b.lease_timeout_s))
                    session, server = client.request(self.deployment.rpc_key, session_timeout_s=b.timeout_s,
                                                     wait_s=b.lease_timeout_s)
                except LeaseTimeoutError as exc:
                    self._requeue(job, 0.0)
                    self._retire(wid, str(exc))
                    return
                except ServerConnectError as exc:  # a server that died between lease and connect
                    self._retry_or_fail(job, f"connect: {exc}")
                    continue
                except DeviceUnreachableError as exc:
                    if client is not None:
                        client.close()
                    client = None  # reconnect (bounded) on the next attempt
                    self._retry_or_fail(job, f"lease: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - anything else on the way to a session
                    self._retry_or_fail(job, f"lease: {describe(exc, limit=300)}")
                    continue
                started = time.monotonic()
                with self._cond:
                    self.stats["leases"] += 1
                    job.server = server
                    if not job.done:
                        job.deadline = started + b.timeout_s + b.grace_s
                try:
                    shapes, dtypes = self._signatures[job.index]
                    m = measure_on_server(session, job.library, self.deployment, shapes, dtypes, self.config,
                                          server=server)
                except Exception as exc:  # noqa: BLE001 - classified below
                    elapsed = time.monotonic() - started
                    text = describe(exc, limit=400)
                    if "RPCSessionTimeoutError" in text or elapsed >= b.timeout_s:
                        with self._cond:
                            self.stats["timeouts"] += 1
                        self._fail(job, f"timeout: the candidate ran past {b.timeout_s:g} s on server {server}; "
                                        f"the server ended the session ({text[:200]})", server=server)
                    else:
                        self._retry_or_fail(job, f"server {server}: {text}")
                else:
                    self._resolve(job, m, {"server": server, "seconds": round(time.monotonic() - started, 3)})
                finally:
                    del session  # closing the connection gives the server back to the tracker
        finally:
            if client is not None:
                client.close()
            with self._cond:
                self._workers.pop(wid, None)
                self._cond.notify_all()

    def _retry_or_fail(self, job: _Job, error: str) -> None:
        job.errors.append(error)
        job.attempts += 1
        if job.attempts > self.batch.max_retries:
            self._fail(job, f"failed after {job.attempts} attempts; last: {error}")
            return
        with self._cond:
            self.stats["retries"] += 1
        self._requeue(job, self.batch.backoff_s * 2 ** (job.attempts - 1))

    def _retire(self, wid: int, reason: str) -> None:
        with self._cond:
            self._workers.pop(wid, None)
            self._retired_reason = reason
            self._cond.notify_all()

    def _spawn_worker(self) -> None:
        with self._cond:
            wid = self._next_worker
            self._next_worker += 1
            t = threading.Thread(target=self._work, args=(wid,), name=f"omnic-farm-{wid}", daemon=True)
            self._workers[wid] = t
            self.stats["workers"] += 1
        t.start()

    # ---------------------------------------------------------------------------------- run
    def run(self, n_workers: int) -> None:
        """Measure every candidate; returns when each one has a result."""
        b = self.batch
        producer = threading.Thread(target=self._produce, name="omnic-farm-compile", daemon=True)
        producer.start()
        for _ in range(max(1, n_workers)):
            self._spawn_worker()
        try:
            while True:
                with self._cond:
                    if self._remaining == 0:
                        break
                    self._cond.wait(timeout=0.5)
                    now = time.monotonic()
                    # A server that neither answers nor ends the session: give up on it, let a
                    # fresh worker lease another (the abandoned thread is a daemon).
                    stuck = [j for j in self.jobs if j.deadline is not None and not j.done
                             and now > j.deadline]
                    for job in stuck:
                        self._workers.pop(job.worker, None)  # its thread exits if it ever returns
                        self.stats["abandoned"] += 1
                    no_workers = not self._workers and self._remaining > 0
                for job in stuck:
                    self._fail(job, f"timeout: no answer from server {job.server or '(none leased)'} "
                                    f"within {b.timeout_s:g} s + {b.grace_s:g} s grace; the server was "
                                    "abandoned", server=job.server)
                    self._spawn_worker()
                if stuck:
                    with self._cond:
                        no_workers = not self._workers and self._remaining > 0
                if no_workers:
                    if producer.is_alive() and self._retired_reason is None:
                        continue
                    reason = self._retired_reason or "no worker left"
                    with self._cond:
                        self._stop = True
                    producer.join()
                    for job in self.jobs:
                        if not job.done:
                            self._fail(job, f"not measured: {reason}")
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            producer.join(timeout=1.0)


def count_servers(deployment: Deployment, batch: BatchConfig) -> int:
    """Servers registered under the deployment's key.

    Raises:
        NoServerError: None is (at once, naming the key and the tracker).
        DeviceUnreachableError: The tracker is unreachable.
    """
    return len(require_servers(deployment.tracker, deployment.rpc_key, timeout_s=batch.connect_timeout_s))

