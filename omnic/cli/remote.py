"""``omnic tracker``, ``omnic serve`` and ``omnic devices --tracker``: remote devices from the shell.

The commands import :mod:`omnic.remote` when they run, not when the parser is built: it loads
TVM, which takes seconds, and ``omnic --help`` or ``omnic devices`` need none of it.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from omnic.core.address import DEFAULT_BIND_HOST, DEFAULT_SERVER_PORT, DEFAULT_TRACKER_PORT, parse_address
from omnic.core.targets import get_device

TRUSTED_NETWORK_WARNING = (
    "An RPC server runs any code a client uploads to it: run trackers and servers only on a "
    "trusted network. Both bind to 127.0.0.1 unless --host is given.")


def cmd_tracker(args: argparse.Namespace) -> int:
    """``omnic tracker``: TVM's tracker in the foreground until Ctrl-C."""
    from omnic.remote import serve

    tracker = serve.start_tracker(host=args.host, port=args.port, port_end=args.port_end, silent=args.silent)
    print(f"omnic: RPC tracker listening on {args.host}:{tracker.port}. {TRUSTED_NETWORK_WARNING}", flush=True)
    return serve.wait(tracker)


def cmd_serve(args: argparse.Namespace) -> int:
    """``omnic serve``: TVM's server registered at a tracker, in the foreground until Ctrl-C."""
    from omnic.remote import serve

    key = args.key or get_device(args.device).rpc_key
    host, port = parse_address(args.tracker)
    port_end = args.port_end or args.port + 100

    def start(previous_port: int | None):
        # A restart asks for the port it had first, so the tracker lists the same address again.
        server = serve.start_server(tracker=args.tracker, key=key, host=args.host, port=previous_port or args.port,
                                    port_end=port_end, custom_addr=args.custom_addr, threads=args.threads,
                                    connect_timeout_s=args.connect_timeout, silent=args.silent)
        if previous_port is None:
            print(f"omnic: serving key {key!r} on {args.host}:{server.port}, registered at tracker "
                  f"{host}:{port}. {TRUSTED_NETWORK_WARNING}", flush=True)
        return server

    # A server that drops off the tracker (a session killed or crashed) is started again, loudly;
    # if it cannot be, the command exits non-zero instead of listening unregistered.
    return serve.supervise(start, restart_timeout_s=max(30.0, 6 * args.connect_timeout))


def cli_devices(args: argparse.Namespace) -> int:
    """``omnic devices --tracker HOST:PORT``: the tracker's keys with their free/pending servers."""
    from omnic.remote.tracker import queue_status

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
