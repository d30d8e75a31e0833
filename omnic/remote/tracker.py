"""The tracker client: reach a TVM RPC tracker and lease servers from it, every wait bounded.

omnic uses TVM's own tracker and server (``tvm.rpc``, ``python -m tvm.exec.rpc_tracker``,
``python -m tvm.exec.rpc_server``, or ``omnic tracker`` / ``omnic serve``, which start the same
ones); it adds no distribution layer of its own. What it adds is bounded waiting: TVM's tracker
client retries a refused connection for a minute and blocks forever on an unroutable address or
an empty queue, so every wait here has a deadline and ends in a typed error naming the address.

Security: **a TVM RPC server runs whatever code a client uploads to it**, with the rights of the
user who started it. Run trackers and servers only on a trusted network (or over an SSH tunnel).
omnic binds both to 127.0.0.1 unless an address is given explicitly.
"""
from __future__ import annotations

import contextlib
import errno
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from tvm import rpc
from tvm.rpc import base

from omnic.core.address import parse_address
from omnic.core.errors import (DeviceUnreachableError, LeaseTimeoutError, NoServerError, OmnicError,
                               ServerConnectError, describe)


@dataclass(frozen=True, kw_only=True)
class RpcConfig:
    """How long to wait for the tracker and its servers.

    Attributes:
        connect_timeout_s: Bound on reaching the tracker (refused connections are retried until
            then; an unroutable address fails at the deadline).
        lease_timeout_s: Bound on waiting for a free server under the key.
        session_timeout_s: The server ends a session after this long (0: never). Used for
            per-candidate timeouts; a ``DeviceModel`` keeps its lease without one.
        max_retries: A measurement whose server failed (session killed, connection lost) is
            retried this many times, each on a fresh lease.
        reregister_wait_s: Before such a retry, how long to wait for a server under the key to
            be registered again (``omnic serve`` re-registers after a failed session).
    """

    connect_timeout_s: float = 10.0
    lease_timeout_s: float = 120.0
    session_timeout_s: float = 0.0
    max_retries: int = 2
    reregister_wait_s: float = 30.0


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
        DeploymentError: ``address`` is not ``HOST:PORT``.
        DeviceUnreachableError: The tracker cannot be reached within ``config.connect_timeout_s``.
    """

    def __init__(self, address: str | tuple[str, int], config: RpcConfig | None = None):
        self._sock: socket.socket | None = None  # first: __del__ runs even when parsing fails
        self.host, self.port = parse_address(address)
        self.config = config or RpcConfig()
        self._connect()

    @property
    def address(self) -> str:
        """``"host:port"`` of the tracker, as error messages name it."""
        return f"{self.host}:{self.port}"

    def _unreachable(self, why: str) -> DeviceUnreachableError:
        return DeviceUnreachableError(
            f"cannot reach the RPC tracker at {self.address} within {self.config.connect_timeout_s:g} s: "
            f"{why}.\n  Is it running? Start one with `omnic tracker --port {self.port}` on that machine "
            "(and check the address, the port and any firewall in between).")

    def _connect(self) -> None:
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

    def require_servers(self, key: str, *, wait_s: float = 0.0) -> list[str]:
        """The servers registered under ``key``; fail at once when there are none.

        A lease request for a key nobody serves would wait the whole lease timeout in silence:
        every path that leases asks this first. ``wait_s`` > 0 gives a server that is
        re-registering (after ``omnic serve`` restarted it) that long to come back.

        Raises:
            NoServerError: No server under ``key`` (after ``wait_s``), naming the key and tracker.
            DeviceUnreachableError: The tracker does not answer.
        """
        deadline = time.monotonic() + wait_s
        while True:
            servers = self.servers(key)
            if servers or time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if not servers:
            others = sorted({str(i.get("key", "")).split(":", 1)[-1] for i in self.summary().get("server_info", [])})
            waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
            raise NoServerError(
                f"no server is registered under key {key!r} at tracker {self.address}{waited}; keys with servers "
                f"there: {', '.join(map(repr, others)) or 'none'}. Start one on the device with `omnic serve "
                f"--tracker {self.address} --key {key}`, or fix the deployment's key.")
        return servers

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
                f"reached from here ({describe(exc, limit=300)}); a server must be reachable "
                "from the client as well as from the tracker (see `omnic serve --custom-addr`)") from exc
        return session, f"{url}:{port}"

    def close(self) -> None:
        """Close the connection; a lease request still waiting is withdrawn at the tracker."""
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


def require_servers(address: str | tuple[str, int], key: str, *, timeout_s: float = 10.0,
                    wait_s: float = 0.0) -> list[str]:
    """The servers under ``key`` at the tracker ``address``; :class:`NoServerError` at once if none.

    The one check every leasing path runs first (see :meth:`TrackerClient.require_servers`).
    """
    with connect_tracker(address, timeout_s=timeout_s) as client:
        return client.require_servers(key, wait_s=wait_s)


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


__all__ = ["RpcConfig", "TrackerClient", "connect_tracker", "queue_status", "require_servers"]
