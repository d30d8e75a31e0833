"""TVM's tracker and server, started from this process for ``omnic tracker`` / ``omnic serve``.

Both are TVM's own (``tvm.rpc.tracker.Tracker``, ``tvm.rpc.Server``), so boards may run either
these or ``python -m tvm.exec.rpc_server``. What omnic adds is a bounded check of the tracker
address before a server starts: TVM's server retries a wrong address quietly for ever.
"""
from __future__ import annotations

import os

from tvm import rpc
from tvm.rpc.tracker import Tracker

from omnic.core.address import parse_address
from omnic.remote.tracker import connect_tracker


def start_tracker(*, host: str, port: int, port_end: int | None = None, silent: bool = False) -> Tracker:
    """Start a tracker (in a child process) on the first free port in ``[port, port_end)``.

    Returns:
        TVM's tracker; ``.port`` is the port it got. :func:`wait` blocks on it.
    """
    return Tracker(host, port=port, port_end=port_end or port + 1, silent=silent)


def start_server(*, tracker: str | tuple[str, int], key: str, host: str, port: int, port_end: int | None = None,
                 custom_addr: str | None = None, threads: int | None = None, connect_timeout_s: float = 10.0,
                 silent: bool = False) -> rpc.Server:
    """Start a server (in a child process) registered at ``tracker`` under ``key``.

    Args:
        tracker: ``"HOST:PORT"`` of the tracker.
        key: The key clients lease this server under.
        host: Address to bind; the tracker's clients must reach it (or ``custom_addr``).
        port: First port to try; up to ``port_end`` (default ``port + 100``).
        custom_addr: Address reported to the tracker instead of ``host`` (behind NAT).
        threads: ``TVM_NUM_THREADS`` for the code the server runs.
        connect_timeout_s: Bound on reaching the tracker before the server starts.
        silent: Quiet TVM's logging.

    Returns:
        TVM's server; ``.port`` is the port it got. :func:`wait` blocks on it.

    Raises:
        DeploymentError: ``tracker`` is not ``HOST:PORT``.
        DeviceUnreachableError: The tracker does not answer within ``connect_timeout_s``.
    """
    address = parse_address(tracker)
    if threads:
        # Read once by the thread pool of each session process, which inherits this environment.
        os.environ["TVM_NUM_THREADS"] = str(threads)
    connect_tracker(address, timeout_s=connect_timeout_s).close()
    return rpc.Server(host, port=port, port_end=port_end or port + 100, tracker_addr=address, key=key,
                      custom_addr=custom_addr, silent=silent)


def wait(started: Tracker | rpc.Server) -> int:
    """Block until a started tracker or server exits; Ctrl-C ends it. Returns 0 (an exit status)."""
    try:
        started.proc.join()
    except KeyboardInterrupt:
        started.terminate()
    return 0


__all__ = ["start_server", "start_tracker", "wait"]
