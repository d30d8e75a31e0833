"""Remote devices through TVM's RPC tracker: lease, upload, run, time, tune.

omnic uses TVM's own tracker and server (``tvm.rpc``, ``python -m tvm.exec.rpc_tracker``,
``python -m tvm.exec.rpc_server``, or ``omnic tracker`` / ``omnic serve``, which start the same
ones); it adds no distribution layer of its own. What it adds is bounded waiting: TVM's tracker
client retries a refused connection for a minute and blocks forever on an unroutable address or
an empty queue, so every wait here has a deadline and ends in a typed error naming the address.

Security: **a TVM RPC server runs whatever code a client uploads to it**, with the rights of the
user who started it. Run trackers and servers only on a trusted network (or over an SSH tunnel).
omnic binds both to 127.0.0.1 unless an address is given explicitly.

The remote flow (TVM_NOTES 4): compile here for the device's target, export the executable
(``.so`` where this machine's toolchain links for the device, ``.tar`` otherwise, which the
server links with its own compiler), ``upload``, ``load_module``, build a Relax VM on the remote
device, allocate inputs there, and call through ``set_input`` / ``invoke_stateful`` /
``get_outputs`` (a tuple returned by ``vm["main"]`` over RPC cannot be indexed).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import struct
import sys
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from omnic.core.deployment import Deployment
from omnic.core.errors import (DeviceUnreachableError, LeaseTimeoutError, MeasurementError, OmnicError,
                               ServerConnectError)
from omnic.core.measure import MeasureConfig, Measurement, time_vm

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090
DEFAULT_BIND_HOST = "127.0.0.1"

TRUSTED_NETWORK_WARNING = (
    "An RPC server runs any code a client uploads to it: run trackers and servers only on a "
    "trusted network. Both bind to 127.0.0.1 unless --host is given.")




@dataclass(frozen=True, kw_only=True)
class RpcConfig:
    """How long to wait for the tracker and its servers.

    Attributes:
        connect_timeout_s: Bound on reaching the tracker (refused connections are retried until
            then; an unroutable address fails at the deadline).
        lease_timeout_s: Bound on waiting for a free server under the key.
        session_timeout_s: The server ends a session after this long (0: never). Used for
            per-candidate timeouts; a ``DeviceModel`` keeps its lease without one.
    """

    connect_timeout_s: float = 10.0
    lease_timeout_s: float = 120.0
    session_timeout_s: float = 0.0


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``(host, port)`` -> ``(host, port)``.

    Raises:
        DeviceUnreachableError: A malformed address.
    """
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeviceUnreachableError(
            f"tracker address must look like HOST:PORT (e.g. 127.0.0.1:9190), got {address!r}")
    return host, int(port)


def _rpc():
    from tvm import rpc
    from tvm.rpc import base

    return rpc, base


# ------------------------------------------------------------------------------ tracker client
class TrackerClient:
    """A connection to a TVM RPC tracker with every wait bounded.

    Speaks the tracker's own protocol through ``tvm.rpc.base`` (the same messages as
    ``tvm.rpc.TrackerSession``), but with socket timeouts, so an unreachable tracker or an empty
    queue ends in :class:`~omnic.core.errors.DeviceUnreachableError` instead of a hang. One client
    per thread: a tracker connection answers one request at a time.

    Args:
        address: ``"HOST:PORT"`` of the tracker.
        config: Timeouts.

    Raises:
        DeviceUnreachableError: The tracker cannot be reached within ``config.connect_timeout_s``.
    """

    def __init__(self, address: str | tuple[str, int], config: RpcConfig | None = None):
        self.host, self.port = parse_address(address)
        self.config = config or RpcConfig()
        self._sock: socket.socket | None = None
        self._connect()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _unreachable(self, why: str) -> DeviceUnreachableError:
        return DeviceUnreachableError(
            f"cannot reach the RPC tracker at {self.address} within {self.config.connect_timeout_s:g} s: "
            f"{why}.\n  Is it running? Start one with `omnic tracker --port {self.port}` on that machine "
            "(and check the address, the port and any firewall in between).")

    def _connect(self) -> None:
        _, base = _rpc()
        deadline = time.monotonic() + self.config.connect_timeout_s
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unreachable(last)
            try:
                sock = socket.create_connection((self.host, self.port), timeout=left)
                try:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                    magic = struct.unpack("<i", base.recvall(sock, 4))[0]
                except (OSError, RuntimeError) as exc:
                    sock.close()
                    raise self._unreachable(f"no tracker handshake ({exc})") from None
                if magic != base.RPC_TRACKER_MAGIC:
                    sock.close()
                    raise DeviceUnreachableError(f"{self.address} answered, but it is not a TVM RPC tracker")
                self._sock = sock
                return
            except socket.timeout:
                raise self._unreachable("connection timed out") from None
            except socket.gaierror as exc:
                raise self._unreachable(f"unknown host ({exc})") from None
            except OSError as exc:
                # A tracker that is starting up refuses connections for a moment: retry until the deadline.
                last = f"{exc.strerror or exc}"
                if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN):
                    raise self._unreachable(last) from None
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def _call(self, message: list[Any], timeout_s: float | None) -> Any:
        _, base = _rpc()
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.settimeout(timeout_s)
        try:
            base.sendjson(self._sock, message)
            return base.recvjson(self._sock)
        except (OSError, RuntimeError, ValueError):
            self.close()  # the connection is in an unknown state; the next call reconnects
            raise

    def summary(self) -> dict[str, Any]:
        """The tracker's summary: ``{"queue_info": {key: {"free", "pending"}}, "server_info": [...]}``."""
        _, base = _rpc()
        try:
            value = self._call([base.TrackerCode.SUMMARY], self.config.connect_timeout_s)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._unreachable(f"the summary request failed ({exc})") from None
        if value[0] != base.TrackerCode.SUCCESS:
            raise DeviceUnreachableError(f"tracker {self.address} refused the summary request: {value!r}")
        return value[1]

    def servers(self, key: str) -> list[str]:
        """``"host:port"`` of each server registered under ``key`` (free or leased)."""
        out = []
        for info in self.summary().get("server_info", []):
            if info.get("key") == f"server:{key}":
                addr = info.get("addr") or ["?", "?"]
                out.append(f"{addr[0]}:{addr[1]}")
        return sorted(out)

    def request(self, key: str, *, session_timeout_s: float = 0.0, wait_s: float | None = None,
                priority: int = 1) -> tuple[Any, str]:
        """Lease a server under ``key`` and open a session on it.

        Args:
            key: The device key.
            session_timeout_s: The server ends the session (killing what runs in it) after this
                long; 0 keeps it open until it is closed.
            wait_s: Bound on waiting for a free server (default ``config.lease_timeout_s``).
            priority: Tracker priority (higher first).

        Returns:
            ``(tvm.rpc.RPCSession, "host:port" of the server)``.

        Raises:
            LeaseTimeoutError: No server became free in time.
            DeviceUnreachableError: The tracker went away.
        """
        rpc, base = _rpc()
        wait = self.config.lease_timeout_s if wait_s is None else wait_s
        try:
            value = self._call([base.TrackerCode.REQUEST, key, "", priority], wait)
        except socket.timeout:
            # Closing the connection (done in _call) withdraws the pending request at the tracker.
            queue = {}
            with contextlib.suppress(OmnicError):
                queue = self.summary().get("queue_info", {}).get(key, {})
            raise LeaseTimeoutError(
                f"no server under key {key!r} became free at tracker {self.address} within {wait:g} s "
                f"(queue: {queue or 'no server has ever registered under this key'}); start one with "
                f"`omnic serve --tracker {self.address} --key {key}`") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._unreachable(f"the lease request failed ({exc})") from None
        if value[0] != base.TrackerCode.SUCCESS:
            raise DeviceUnreachableError(f"tracker {self.address} refused the lease for {key!r}: {value!r}")
        url, port, matchkey = value[1]
        try:
            session = rpc.connect(url, port, matchkey, session_timeout=session_timeout_s)
        except Exception as exc:  # noqa: BLE001 - TVM raises plain runtime errors here
            # The tracker handed out a server that is gone or unreachable from here.
            raise ServerConnectError(
                f"the tracker at {self.address} leased server {url}:{port} for key {key!r}, but it cannot be "
                f"reached from here ({type(exc).__name__}: {str(exc)[:300]}); a server must be reachable "
                "from the client as well as from the tracker (see `omnic serve --custom-addr`)") from exc
        return session, f"{url}:{port}"

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> "TrackerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def connect_tracker(address: str | tuple[str, int], *, timeout_s: float = 10.0) -> TrackerClient:
    """Connect to a tracker, failing with :class:`DeviceUnreachableError` after ``timeout_s``."""
    return TrackerClient(address, RpcConfig(connect_timeout_s=timeout_s))


def queue_status(address: str | tuple[str, int], *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """One row per key at the tracker: ``{"key", "servers", "free", "pending", "addresses"}``."""
    with connect_tracker(address, timeout_s=timeout_s) as client:
        summary = client.summary()
    servers: dict[str, list[str]] = {}
    for info in summary.get("server_info", []):
        key = str(info.get("key", "")).split(":", 1)[-1]
        addr = info.get("addr") or ["?", "?"]
        servers.setdefault(key, []).append(f"{addr[0]}:{addr[1]}")
    keys = sorted(set(summary.get("queue_info", {})) | set(servers))
    rows = []
    for key in keys:
        q = summary.get("queue_info", {}).get(key, {})
        rows.append({"key": key, "servers": len(servers.get(key, [])), "free": int(q.get("free", 0)),
                     "pending": int(q.get("pending", 0)), "addresses": sorted(servers.get(key, []))})
    return rows


# --------------------------------------------------------------------------- remote execution
def export_for_upload(executable: Any, deployment: Deployment, directory: str | os.PathLike) -> Path:
    """Write ``executable`` where it can be uploaded: ``.so`` when this machine links for the
    device (``host``), ``.tar`` otherwise (the server links it with its own compiler)."""
    ext = deployment.spec.export_format
    path = Path(directory) / f"omnic_{uuid.uuid4().hex[:12]}.{ext}"
    executable.export_library(str(path))
    return path


def remote_devices(session: Any, deployment: Deployment) -> list[Any]:
    """The VM's devices on the remote side: the compute device, plus the remote CPU for shape
    functions (the VM would otherwise add *this* machine's CPU)."""
    api = deployment.spec.device_api
    dev = session.cpu(0) if api == "cpu" else session.device(api, 0)
    return [dev] if api == "cpu" else [dev, session.cpu(0)]


def load_remote_vm(session: Any, library: Path, deployment: Deployment) -> tuple[Any, Any, Any]:
    """Upload ``library``, load it on the server and build a Relax VM there.

    Returns:
        ``(vm, device, remote_module)``.
    """
    from tvm import relax

    session.upload(str(library), target=library.name)
    rlib = session.load_module(library.name)
    devs = remote_devices(session, deployment)
    vm = relax.VirtualMachine(rlib, devs if len(devs) > 1 else devs[0])
    return vm, devs[0], rlib


def _remote_tensor(array: np.ndarray, dev: Any) -> Any:
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array), dev)


def run_remote_vm(vm: Any, inputs: Sequence[Any], func_name: str = "main") -> Any:
    """Run and fetch outputs through the stateful interface (tuples over RPC need it)."""
    vm.set_input(func_name, *inputs)
    vm.invoke_stateful(func_name)
    return vm.get_outputs(func_name)


class RemoteRuntime:
    """Runs an executable on a device leased from the tracker (the runtime of a remote
    ``DeviceModel``).

    The lease is taken on first use and held until :meth:`close` (or garbage collection), so
    repeated calls do not upload again; close it to give the server back to the farm.

    Args:
        executable: The built Relax executable (or an exported library with ``export_library``).
        deployment: A deployment with ``tracker`` set.
        module: The final Relax IRModule (lets :meth:`kernel_times` time each kernel).
        config: Tracker timeouts.
    """

    def __init__(self, executable: Any, deployment: Deployment, *, module: Any = None,
                 config: RpcConfig | None = None):
        if not deployment.is_remote:
            raise DeviceUnreachableError("RemoteRuntime needs a deployment with a tracker (\"HOST:PORT\")")
        self.executable = executable
        self.deployment = deployment
        self.module = module
        self.config = config or RpcConfig()
        self.server: str | None = None
        self._session = None
        self._vm = None
        self._dev = None
        self._rlib = None
        self._kernels = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._client: TrackerClient | None = None
        self._finalizer = weakref.finalize(self, RemoteRuntime._release, self.__dict__)

    # The lease is taken lazily so that building a DeviceModel never blocks on the farm.
    def _ensure(self) -> None:
        if self._vm is not None:
            return
        d = self.deployment
        self._client = TrackerClient(d.tracker, self.config)
        self._tmp = tempfile.TemporaryDirectory(prefix="omnic-rpc-")
        lib = export_for_upload(self.executable, d, self._tmp.name)
        self._session, self.server = self._client.request(
            d.rpc_key, session_timeout_s=self.config.session_timeout_s)
        try:
            self._vm, self._dev, self._rlib = load_remote_vm(self._session, lib, d)
        except Exception as exc:
            self.close()
            raise MeasurementError(f"loading the model on {d.device} (server {self.server}) failed: "
                                   f"{type(exc).__name__}: {str(exc)[:500]}") from exc

    @property
    def vm(self) -> Any:
        self._ensure()
        return self._vm

    @property
    def dev(self) -> Any:
        self._ensure()
        return self._dev

    def to_device(self, array: np.ndarray) -> Any:
        """Copy a numpy array to the remote device."""
        self._ensure()
        return _remote_tensor(array, self._dev)

    def run(self, arrays: Sequence[np.ndarray]) -> Any:
        """Run ``main`` on the device; returns the output tensor or a tuple of them."""
        self._ensure()
        return run_remote_vm(self._vm, [self.to_device(a) for a in arrays])

    def measure(self, arrays: Sequence[np.ndarray], config: MeasureConfig, device_name: str) -> Measurement:
        """Time ``main`` on the device with the shared protocol (:func:`omnic.core.measure.time_vm`)."""
        self._ensure()
        return time_vm(self._vm, self._dev, [self.to_device(a) for a in arrays], config, device_name=device_name)

    def kernel_times(self, inputs: Sequence[Any], *, runs: int = 10) -> list[dict[str, Any]]:
        """Per-kernel time on the device: each kernel the model calls, timed on its own there
        with random arguments of its shapes (the VM's instrument hook cannot call back over RPC).

        Falls back to one row for the whole model when the IRModule is not known.
        """
        self._ensure()
        kernels_lib = self._kernel_library()
        if kernels_lib is None:
            res = self._vm.time_evaluator("main", self._dev, number=runs, repeat=1)(*inputs)
            ms = float(res.mean) * 1e3
            return [{"name": "main", "kind": "model", "calls": 1, "total_ms": ms, "share": 1.0}]
        rows = []
        rng = np.random.default_rng(0)
        for name, calls, params in _kernel_calls(self.module):
            args = [_remote_tensor(rng.standard_normal(shape).astype(dtype) if "float" in dtype else
                                   np.zeros(shape, dtype=dtype), self._dev) for shape, dtype in params]
            try:
                evaluator = kernels_lib.time_evaluator(name, self._dev, number=runs, repeat=1)
                per_call = float(evaluator(*args).mean) * 1e3
            except Exception:  # noqa: BLE001 - a kernel the library does not export by name
                continue
            rows.append({"name": name, "kind": "kernel", "calls": calls, "total_ms": per_call * calls})
        total = sum(r["total_ms"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["total_ms"] / total
        rows.sort(key=lambda r: -r["total_ms"])
        return rows

    def _kernel_library(self) -> Any:
        """The compiled kernels as a module of their own on the device, or None.

        A remote VM executable does not look kernels up in its imports, and a module's imports
        cannot be walked over RPC; the kernel library is exported and uploaded separately instead.
        """
        if self._kernels is not None:
            return self._kernels
        imports = getattr(getattr(self.executable, "mod", None), "imports", None)
        if self.module is None or not imports:
            return None
        assert self._tmp is not None
        path = Path(self._tmp.name) / f"omnic_kernels_{uuid.uuid4().hex[:8]}.{self.deployment.spec.export_format}"
        imports[0].export_library(str(path))
        self._session.upload(str(path), target=path.name)
        self._kernels = self._session.load_module(path.name)
        return self._kernels

    @staticmethod
    def _release(state: dict[str, Any]) -> None:
        # Drop the VM and the session first: the server is freed when the connection closes.
        for name in ("_vm", "_rlib", "_kernels", "_dev", "_session"):
            state[name] = None
        client = state.get("_client")
        if client is not None:
            client.close()
            state["_client"] = None
        tmp = state.get("_tmp")
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()
            state["_tmp"] = None

    def close(self) -> None:
        """Give the server back to the tracker."""
        RemoteRuntime._release(self.__dict__)


def _kernel_calls(module: Any) -> list[tuple[str, int, list[tuple[tuple[int, ...], str]]]]:
    """``(kernel name, calls, [(shape, dtype) of each argument])`` for each ``call_tir`` kernel,
    with the argument shapes read from the call sites (static shapes only)."""
    import tvm
    from tvm import relax

    calls: dict[str, int] = {}
    order: list[str] = []
    params: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def ty(expr: Any) -> Any:
        # TVM 0.27 calls it ``ty``; older releases ``struct_info``.
        return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)

    def tensors(t: Any) -> list[tuple[tuple[int, ...], str]] | None:
        if hasattr(t, "fields"):  # a tuple type
            out: list[tuple[tuple[int, ...], str]] = []
            for field in t.fields:
                sub = tensors(field)
                if sub is None:
                    return None
                out += sub
            return out
        shape = getattr(t, "shape", None)
        if shape is not None and hasattr(t, "dtype"):
            try:
                return [(tuple(int(d) for d in shape.values), str(t.dtype))]
            except (TypeError, AttributeError):
                return None  # a symbolic dimension
        return None

    def visit(expr: Any) -> None:
        if not (isinstance(expr, relax.Call) and expr.op == call_tir) or len(expr.args) > 2:
            return
        name = expr.args[0].name_hint
        if name not in calls:
            order.append(name)
            sig: list[tuple[tuple[int, ...], str]] | None = []
            for arg in expr.args[1].fields:
                sub = tensors(ty(arg))
                sig = None if sub is None or sig is None else sig + sub
            out = tensors(ty(expr))
            if sig is not None and out is not None:
                params[name] = sig + out
        calls[name] = calls.get(name, 0) + 1

    for _, func in module.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return [(n, calls[n], params[n]) for n in order if n in params]


# ----------------------------------------------------------------------------------- tuning
def make_rpc_runner(deployment: Any, evaluator_config: Any = None, *, max_workers: int | None = None,
                    session_timeout_s: float = 120.0, connect_timeout_s: float = 10.0) -> Any:
    """A MetaSchedule ``RPCRunner`` that times tuning candidates on the deployment's device.

    The tracker is contacted first, so an unreachable one fails here (bounded) rather than
    inside the tuner. MetaSchedule's builder exports ``.tar`` files by default: the device then
    needs a C compiler to link them (for Android, give the builder an ``f_export`` that uses
    ``tvm.support.ndk.create_shared``).

    Args:
        deployment: A remote deployment (``tracker`` set) or the equivalent dict.
        evaluator_config: ``ms.runner.EvaluatorConfig`` (default: 3 runs of at least 50 ms, one
            repeat, no cache flush).
        max_workers: Concurrent leases (default: the number of servers under the key).
        session_timeout_s: The server ends a session running a candidate after this long.
        connect_timeout_s: Bound on reaching the tracker.

    Returns:
        ``tvm.s_tir.meta_schedule.runner.RPCRunner``.

    Raises:
        DeviceUnreachableError: No tracker in the deployment, the tracker is unreachable, or no
            server is registered under the key.
    """
    from tvm.s_tir import meta_schedule as ms

    deployment = Deployment.coerce(deployment)
    if not deployment.is_remote:
        raise DeviceUnreachableError(
            f"make_rpc_runner needs a deployment with a tracker; {deployment.device!r} has none")
    host, port = deployment.tracker_address
    with connect_tracker((host, port), timeout_s=connect_timeout_s) as client:
        servers = client.servers(deployment.rpc_key)
    if not servers:
        raise DeviceUnreachableError(
            f"no server is registered under key {deployment.rpc_key!r} at tracker {host}:{port}; start one with "
            f"`omnic serve --tracker {host}:{port} --key {deployment.rpc_key}`")
    if evaluator_config is None:
        evaluator_config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                                     enable_cpu_cache_flush=False)
    rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=deployment.rpc_key,
                                     session_priority=1, session_timeout_sec=int(session_timeout_s))
    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator_config,
                               max_workers=max_workers or len(servers))


# --------------------------------------------------------------------- local farm (processes)
def free_port(host: str = DEFAULT_BIND_HOST) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalFarm:
    """A real tracker and real servers on this machine, as subprocesses (tests, benchmarks).

    Each process gets its own session (process group), so :meth:`kill_server` and :meth:`stop`
    end exactly the processes started here, children included.

    Args:
        servers: How many servers to start under ``key``.
        key: The RPC key the servers register under.
        threads: ``TVM_NUM_THREADS`` of each server.
        host: Bind address (loopback by default).
        omnic_servers: How many of the servers to start with ``omnic serve`` rather than
            ``python -m tvm.exec.rpc_server`` (both end up as TVM's server).
        log_dir: Where the processes' logs go (a temporary folder by default).
    """

    def __init__(self, *, servers: int = 2, key: str = "host", threads: int = 1,
                 host: str = DEFAULT_BIND_HOST, omnic_servers: int = 0, log_dir: str | None = None):
        self.key = key
        self.host = host
        self.threads = threads
        self.n_servers = servers
        self.omnic_servers = omnic_servers
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="omnic-farm-"))
        self.port = free_port(host)
        self.tracker_proc = None
        self.server_procs: list[Any] = []
        self.server_ports: list[int] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> Any:
        import subprocess

        env = dict(os.environ, TVM_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        proc._omnic_log = log  # type: ignore[attr-defined]
        return proc

    def start(self, timeout_s: float = 90.0) -> "LocalFarm":
        """Start the tracker and the servers; return once all servers are registered."""
        py = sys.executable
        self.tracker_proc = self._spawn("tracker", [py, "-m", "tvm.exec.rpc_tracker", "--host", self.host,
                                                    "--port", str(self.port), "--port-end", str(self.port + 1)])
        self.wait_servers(0, timeout_s)  # the tracker first: servers fail fast on a missing one
        for _ in range(self.n_servers):
            self.add_server(wait=False)
        self.wait_servers(self.n_servers, timeout_s)
        return self

    def add_server(self, *, wait: bool = True, timeout_s: float = 90.0) -> Any:
        """Start one more server under the key."""
        i = len(self.server_procs)
        port = free_port(self.host)
        common = ["--tracker", self.address, "--key", self.key, "--host", self.host,
                  "--port", str(port), "--port-end", str(port + 1)]
        if i < self.omnic_servers:
            argv = [sys.executable, "-m", "omnic.cli", "serve", *common, "--threads", str(self.threads),
                    "--connect-timeout", "60"]
        else:
            argv = [sys.executable, "-m", "tvm.exec.rpc_server", *common]
        proc = self._spawn(f"server{i}", argv)
        self.server_procs.append(proc)
        self.server_ports.append(port)
        if wait:
            self.wait_servers(len(self.alive_servers()), timeout_s)
        return proc

    def alive_servers(self) -> list[Any]:
        return [p for p in self.server_procs if p.poll() is None]

    def wait_servers(self, count: int, timeout_s: float = 90.0) -> None:
        """Block until ``count`` servers are registered (and free) under the key."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            if self.tracker_proc is not None and self.tracker_proc.poll() is not None:
                raise DeviceUnreachableError(f"the tracker exited: {self.log('tracker')[-2000:]}")
            for i, proc in enumerate(self.server_procs):
                if proc.poll() is not None and getattr(proc, "_omnic_killed", False) is False:
                    raise DeviceUnreachableError(f"server {i} exited: {self.log(f'server{i}')[-2000:]}")
            try:
                with connect_tracker(self.address, timeout_s=2.0) as client:
                    summary = client.summary()
                last = summary
                n = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{self.key}")
                free = summary.get("queue_info", {}).get(self.key, {}).get("free", 0)
                if n >= count and free >= count:
                    return
            except DeviceUnreachableError as exc:
                last = exc
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.log_dir.glob("*.log"))
        raise DeviceUnreachableError(f"local farm: {count} servers did not register in {timeout_s:g} s "
                                     f"(last: {last}); logs:\n{logs}")

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _kill(proc: Any) -> None:
        import signal

        if proc is None or proc.poll() is not None:
            if proc is not None:
                _close_log(proc)
            return
        # The server forks a worker and a process per session: end the whole group we started.
        proc._omnic_killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
        _close_log(proc)

    def kill_server(self, index: int) -> None:
        """SIGKILL server ``index`` and everything it started (a device dropping off the farm)."""
        self._kill(self.server_procs[index])

    def kill_server_at(self, address: str) -> None:
        """SIGKILL the server that listens on ``"host:port"``."""
        port = int(str(address).rpartition(":")[2])
        self.kill_server(self.server_ports.index(port))

    def stop(self) -> None:
        """Kill every process started here (safe to call twice)."""
        for proc in self.server_procs:
            self._kill(proc)
        self._kill(self.tracker_proc)
        if self._own_logs:
            import shutil

            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalFarm":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _close_log(proc: Any) -> None:
    log = getattr(proc, "_omnic_log", None)
    if log is not None and not log.closed:
        log.close()


# ---------------------------------------------------------------------------------------- CLI
def cmd_tracker(args: argparse.Namespace) -> int:
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(args.host, port=args.port, port_end=args.port_end or args.port + 1, silent=args.silent)
    print(f"omnic: RPC tracker listening on {args.host}:{tracker.port}. {TRUSTED_NETWORK_WARNING}", flush=True)
    try:
        tracker.proc.join()
    except KeyboardInterrupt:
        tracker.terminate()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from omnic.core.targets import get_device

    key = args.key or get_device(args.device).rpc_key
    tracker = parse_address(args.tracker)
    if args.threads:
        # Read once by the thread pool of each session process, which inherits this environment.
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    # Fail fast (and bounded) on a wrong tracker address: TVM's server would retry quietly.
    connect_tracker(tracker, timeout_s=args.connect_timeout).close()
    from tvm import rpc

    server = rpc.Server(args.host, port=args.port, port_end=args.port_end or args.port + 100,
                        tracker_addr=tracker, key=key, custom_addr=args.custom_addr, silent=args.silent)
    print(f"omnic: serving key {key!r} on {args.host}:{server.port}, registered at tracker "
          f"{tracker[0]}:{tracker[1]}. {TRUSTED_NETWORK_WARNING}", flush=True)
    try:
        server.proc.join()
    except KeyboardInterrupt:
        server.terminate()
    return 0


def cli_devices(args: argparse.Namespace) -> int:
    """``omnic devices --tracker HOST:PORT``: the tracker's keys with their free/pending servers."""
    rows = queue_status(args.tracker, timeout_s=getattr(args, "timeout", None) or 5.0)
    if getattr(args, "json", False):
        print(json.dumps({"tracker": args.tracker, "keys": rows}, indent=2))
        return 0
    lines = [f"tracker {args.tracker}", f"{'key':<20} {'servers':>7} {'free':>5} {'pending':>7}  addresses"]
    lines += [f"{r['key']:<20} {r['servers']:>7} {r['free']:>5} {r['pending']:>7}  {', '.join(r['addresses'])}"
              for r in rows]
    if not rows:
        lines.append("(no servers registered; attach one with `omnic serve --tracker "
                     f"{args.tracker} --key KEY`)")
    print("\n".join(lines))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``omnic tracker`` and ``omnic serve``."""
    p = subparsers.add_parser(
        "tracker", help="start a TVM RPC tracker (devices register with it)",
        description="Start TVM's RPC tracker in the foreground. " + TRUSTED_NETWORK_WARNING)
    p.add_argument("--host", default=DEFAULT_BIND_HOST,
                   help="address to bind (default 127.0.0.1; 0.0.0.0 to accept devices on a trusted network)")
    p.add_argument("--port", type=int, default=DEFAULT_TRACKER_PORT)
    p.add_argument("--port-end", type=int, help="try ports up to this one if --port is taken")
    p.add_argument("--silent", action="store_true")
    p.set_defaults(func=cmd_tracker)

    p = subparsers.add_parser(
        "serve", help="register this machine as a device at a tracker (runs uploaded code!)",
        description="Start TVM's RPC server and register it at a tracker under a key. "
                    + TRUSTED_NETWORK_WARNING)
    p.add_argument("--tracker", required=True, help="HOST:PORT of the tracker")
    p.add_argument("--key", help="key to register under (default: the device table's key for --device)")
    p.add_argument("--device", default="host", help="device name whose rpc key is the default --key")
    p.add_argument("--host", default=DEFAULT_BIND_HOST,
                   help="address to bind (default 127.0.0.1; the tracker's clients must reach it)")
    p.add_argument("--port", type=int, default=DEFAULT_SERVER_PORT)
    p.add_argument("--port-end", type=int, help="try ports up to this one if --port is taken")
    p.add_argument("--custom-addr", help="address to report to the tracker (e.g. behind NAT)")
    p.add_argument("--threads", type=int, help="TVM_NUM_THREADS for the code this server runs")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the tracker")
    p.add_argument("--silent", action="store_true")
    p.set_defaults(func=cmd_serve)


__all__ = [
    "DEFAULT_TRACKER_PORT", "LeaseTimeoutError", "LocalFarm", "RemoteRuntime", "RpcConfig", "ServerConnectError",
    "TrackerClient",
    "cli_devices", "connect_tracker", "export_for_upload", "load_remote_vm", "make_rpc_runner",
    "parse_address", "queue_status", "register_cli", "run_remote_vm",
]
