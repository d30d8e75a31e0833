"""Remote sessions: upload a compiled model to a leased server, run it there and time it.

The remote flow: compile here for the device's target, export the executable (``.so`` where
this machine's toolchain links for the device, ``.tar`` otherwise, which the server links with
its own compiler), ``upload``, ``load_module``, build a Relax VM on the remote device, allocate
inputs there, and call through ``set_input`` / ``invoke_stateful`` / ``get_outputs``: a tuple
that ``vm["main"]`` returns over RPC is a remote object that cannot be indexed from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tvm
from tvm import relax

from omnic.core.deployment import Deployment
from omnic.core.errors import (DeviceUnreachableError, MeasurementError, NoServerError, OmnicError,
                               ServerConnectError, describe)
from omnic.core.measure import MeasureConfig, Measurement, time_vm
from omnic.core.quiet import native_stderr_filtered
from omnic.remote.tracker import RpcConfig, TrackerClient


def export_for_upload(executable: Any, deployment: Deployment, directory: str | os.PathLike) -> Path:
    """Write ``executable`` where it can be uploaded: ``.so`` when this machine links for the
    device (``host``), ``.tar`` otherwise (the server links it with its own compiler)."""
    ext = deployment.spec.export_format
    path = Path(directory) / f"omnic_{uuid.uuid4().hex[:12]}.{ext}"
    with native_stderr_filtered():  # TVM's "Scope Saving" lines, one per memory scope
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
    session.upload(str(library), target=library.name)
    rlib = session.load_module(library.name)
    devs = remote_devices(session, deployment)
    vm = relax.VirtualMachine(rlib, devs if len(devs) > 1 else devs[0])
    return vm, devs[0], rlib


def remote_tensor(array: np.ndarray, dev: Any) -> Any:
    """Copy a numpy array to ``dev``, a device of a remote session."""
    return tvm.runtime.tensor(np.ascontiguousarray(array), dev)


def random_tensors(signature: Sequence[tuple[Sequence[int], str]], dev: Any,
                   rng: np.random.Generator) -> list[Any]:
    """Arguments to time a function with on ``dev``: one per ``(shape, dtype)``, standard normal
    for floats and zeros otherwise (integer inputs are usually indices, which must stay in range)."""
    return [remote_tensor(rng.standard_normal(shape).astype(dtype) if "float" in dtype else
                          np.zeros(shape, dtype=dtype), dev) for shape, dtype in signature]


#: The global function ``omnic serve`` registers on its server (omnic.remote.serve) to report its
#: load; TVM's plain server has none, and its measurements are stored without a load.
LOAD_FUNCTION = "omnic.server.loadavg"


def server_load(session: Any) -> float | None:
    """The 1-minute load average of the server behind ``session``, or None if it cannot say."""
    try:
        load = float(session.get_function(LOAD_FUNCTION)())
    except Exception:  # noqa: BLE001 - not an omnic server, or an old one: the load is unknown
        return None
    return round(load, 2) if load >= 0 else None


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
    def _ensure(self, wait_s: float = 0.0) -> None:
        if self._vm is not None:
            return
        d = self.deployment
        self._client = TrackerClient(d.tracker, self.config)
        try:
            # A key nobody serves fails here at once, not after the whole lease timeout.
            self._client.require_servers(d.rpc_key, wait_s=wait_s)
        except OmnicError:
            self.close()
            raise
        self._tmp = tempfile.TemporaryDirectory(prefix="omnic-rpc-")
        lib = export_for_upload(self.executable, d, self._tmp.name)
        self._session, self.server = self._client.request(
            d.rpc_key, session_timeout_s=self.config.session_timeout_s)
        try:
            self._vm, self._dev, self._rlib = load_remote_vm(self._session, lib, d)
        except Exception as exc:
            self.close()
            raise MeasurementError(f"loading the model on {d.device} (server {self.server}) failed: "
                                   f"{describe(exc, limit=500)}") from exc

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
        return remote_tensor(array, self._dev)

    def run(self, arrays: Sequence[np.ndarray]) -> Any:
        """Run ``main`` on the device; returns the output tensor or a tuple of them."""
        self._ensure()
        return run_remote_vm(self._vm, [self.to_device(a) for a in arrays])

    def measure(self, arrays: Sequence[np.ndarray], config: MeasureConfig, device_name: str) -> Measurement:
        """Time ``main`` on the device with the shared protocol (:func:`omnic.core.measure.time_vm`).

        A server that fails mid-measurement (its session killed, the connection lost) does not
        fail the measurement: the lease is dropped and the model measured again on a fresh one,
        up to ``config.max_retries`` times, waiting up to ``config.reregister_wait_s`` for a
        server to be registered again. ``attempts`` in the result counts those tries.

        Raises:
            NoServerError: No server under the key (at once on the first try).
            MeasurementError: Every try failed; the message lists each server's error.
        """
        faults: list[str] = []
        for _ in range(self.config.max_retries + 1):
            try:
                self._ensure(wait_s=self.config.reregister_wait_s if faults else 0.0)
                m = time_vm(self._vm, self._dev, [self.to_device(a) for a in arrays], config,
                            device_name=device_name, load_fn=lambda: server_load(self._session))
            except NoServerError as exc:
                if not faults:
                    raise
                raise NoServerError(f"{exc} (the measurement was being retried after: {'; '.join(faults)})") from exc
            except (ServerConnectError, MeasurementError) as exc:  # died between lease and load
                faults.append(f"server {self.server}: {exc}")
            except OmnicError:
                raise
            except Exception as exc:  # noqa: BLE001 - TVM reports a lost session as a plain error
                faults.append(f"server {self.server}: {describe(exc, limit=300)}")
            else:
                return dataclasses.replace(m, attempts=m.attempts + len(faults))
            self.close()  # drop the broken lease; the next try leases afresh
        raise MeasurementError(
            f"measuring on {device_name} failed {len(faults)} times in a row, each on a fresh lease: "
            f"{'; '.join(faults)}. Check the servers' logs (`omnic devices --tracker {self.deployment.tracker}` "
            "lists them); a model that crashes every server it runs on fails this way too.")

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
            args = random_tensors(params, self._dev, rng)
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


__all__ = ["RemoteRuntime", "export_for_upload", "load_remote_vm", "random_tensors", "remote_devices",
           "remote_tensor", "run_remote_vm"]
