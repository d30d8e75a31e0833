"""A local farm: a real TVM tracker and real servers on this machine, as subprocesses.

Tests and benchmarks use it to exercise the same paths a lab farm does (leases, uploads,
servers dying mid-measurement) without any board attached.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omnic.core.address import DEFAULT_BIND_HOST
from omnic.core.errors import DeviceUnreachableError
from omnic.remote.tracker import connect_tracker


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
        self.tracker_proc: subprocess.Popen | None = None
        self.server_procs: list[subprocess.Popen] = []
        self.server_ports: list[int] = []

    @property
    def address(self) -> str:
        """``"host:port"`` of the farm's tracker."""
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
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

    def add_server(self, *, wait: bool = True, timeout_s: float = 90.0) -> subprocess.Popen:
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

    def alive_servers(self) -> list[subprocess.Popen]:
        """The server processes that have not exited."""
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
        """The output so far of process ``name`` (``"tracker"``, ``"server0"``, ...)."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _kill(proc: subprocess.Popen | None) -> None:
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
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "LocalFarm":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _close_log(proc: subprocess.Popen) -> None:
    log = getattr(proc, "_omnic_log", None)
    if log is not None and not log.closed:
        log.close()


__all__ = ["LocalFarm", "free_port"]
