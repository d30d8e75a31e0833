"""Tracker addresses: the one ``"HOST:PORT"`` parser and the default ports.

A deployment validates its ``tracker`` with it when it is made, and the RPC client parses the
same text with it when it connects, so both accept the same inputs and fail the same way.
"""
from __future__ import annotations

from omnic.core.errors import DeploymentError

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090
#: Trackers and servers bind here unless told otherwise: an RPC server runs uploaded code.
DEFAULT_BIND_HOST = "127.0.0.1"


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``(host, port)`` -> ``(host, port)``.

    The port is what follows the last colon, so an IPv6 host works without brackets.

    Raises:
        DeploymentError: No port, no host, or a port that is not a number.
    """
    text = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeploymentError(
            f"tracker address must look like HOST:PORT (e.g. {DEFAULT_BIND_HOST}:{DEFAULT_TRACKER_PORT}), "
            f"got {address!r}")
    return host, int(port)
