"""TVM's tracker and server, started from this process for ``omnic tracker`` / ``omnic serve``.

Both are TVM's own (``tvm.rpc.tracker.Tracker``, ``tvm.rpc.Server``), so boards may run either
these or ``python -m tvm.exec.rpc_server``. What omnic adds:

- a bounded check of the tracker address before a server starts (TVM's server retries a wrong
  address quietly for ever);
- supervision (:func:`supervise`). TVM's server runs its tracker registration and accept loop in
  one thread of a worker process; when a session ends with a non-zero exit status (its process
  killed, the model crashing it) ``tvm.rpc.server._serving`` raises ``RuntimeError`` in that
  thread, the thread dies, its tracker connection closes, and the worker goes on holding the
  listening socket: alive, listening, and gone from the tracker, so every lease for its key
  waits out its timeout. omnic's server worker exits instead (a thread hook installed at start),
  and :func:`supervise` starts a fresh server that registers again, saying so loudly; when it
  cannot (tracker gone, crash loop) ``omnic serve`` exits non-zero;
- the server's load: ``omnic serve`` registers a global function that reports the machine's
  1-minute load average, which remote measurements record.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Callable

import tvm_ffi
from tvm import rpc
from tvm.rpc.tracker import Tracker

from omnic.core.address import parse_address
from omnic.core.errors import OmnicError, describe
from omnic.core.measure import local_load
from omnic.remote.session import LOAD_FUNCTION
from omnic.remote.tracker import connect_tracker

#: Exit status of a server worker whose listen loop died (see the module docstring).
LISTEN_LOOP_DIED = 75


def _server_init() -> None:
    """Runs inside TVM's server worker before it listens (``server_init_callback``)."""
    default_hook = threading.excepthook

    def exit_on_dead_thread(args: threading.ExceptHookArgs) -> None:
        # The only thread of the worker is TVM's listen loop: once it is dead the server is off
        # the tracker for good, so end the worker and let the supervisor register a fresh one.
        default_hook(args)
        print(f"omnic serve: TVM's server loop ended ({args.exc_type.__name__}: {args.exc_value}); "
              "the server is off the tracker: restarting it", file=sys.stderr, flush=True)
        os._exit(LISTEN_LOOP_DIED)

    threading.excepthook = exit_on_dead_thread
    # Sessions are forked from this worker, so they inherit the function (and see this machine).
    tvm_ffi.register_global_func(LOAD_FUNCTION, _load_or_unknown, override=True)


def _load_or_unknown() -> float:
    load = local_load()
    return -1.0 if load is None else load  # an RPC function returns a number: -1 means unknown


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
        TVM's server; ``.port`` is the port it got. :func:`supervise` keeps it registered.

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
                      custom_addr=custom_addr, silent=silent, server_init_callback=_server_init)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def supervise(start: Callable[[int | None], rpc.Server], *, max_restarts: int = 5, window_s: float = 300.0,
              restart_timeout_s: float = 120.0, poll_s: float = 0.5,
              log: Callable[[str], None] = _say) -> int:
    """Run a server and start it again whenever its worker exits; block until Ctrl-C.

    Args:
        start: ``start(port)`` starts a server (``port`` None: the first start; else the port the
            previous one had, so the address at the tracker stays the same) and returns it.
        max_restarts: More restarts than this within ``window_s`` is a crash loop: give up.
        window_s: The window for ``max_restarts``.
        restart_timeout_s: How long to keep trying to start a server again (the tracker may be
            restarting too) before giving up.
        poll_s: How often to look at the worker.
        log: Where the loud lines go (stderr).

    Returns:
        The exit status: 0 after Ctrl-C, 1 when the server could not be kept registered.
    """
    server = start(None)
    restarts: collections.deque[float] = collections.deque()
    try:
        while True:
            if server.proc is not None and server.proc.is_alive():
                time.sleep(poll_s)
                continue
            status = getattr(getattr(server.proc, "_proc", None), "returncode", None)
            port = server.port
            server.terminate()  # reap it; its listening socket is closed with it
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > window_s:
                restarts.popleft()
            if len(restarts) > max_restarts:
                log(f"omnic serve: ERROR: the server on port {port} stopped {len(restarts)} times within "
                    f"{window_s:g} s (last exit status {status}); giving up. Look at the lines above for the "
                    "failing sessions, then start `omnic serve` again.")
                return 1
            log(f"omnic serve: the server on port {port} dropped off the tracker (worker exit status {status}: "
                "a session ended abnormally); registering again")
            server = _start_again(start, port, restart_timeout_s, log)
            if server is None:
                return 1
            log(f"omnic serve: registered again on port {server.port}")
    except KeyboardInterrupt:
        server.terminate()
        return 0


def _start_again(start: Callable[[int | None], rpc.Server], port: int, timeout_s: float,
                 log: Callable[[str], None]) -> rpc.Server | None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return start(port)
        except (OmnicError, OSError, ValueError, RuntimeError) as exc:
            if time.monotonic() >= deadline:
                log(f"omnic serve: ERROR: could not register the server again within {timeout_s:g} s "
                    f"({describe(exc, limit=300)}); exiting. Check that the tracker is running, then start "
                    "`omnic serve` again.")
                return None
            time.sleep(2.0)


def wait(started: Tracker | rpc.Server) -> int:
    """Block until a started tracker or server exits; Ctrl-C ends it. Returns 0 (an exit status)."""
    try:
        started.proc.join()
    except KeyboardInterrupt:
        started.terminate()
    return 0


__all__ = ["LISTEN_LOOP_DIED", "start_server", "start_tracker", "supervise", "wait"]
