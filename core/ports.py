"""TCP ports on loopback for the services this project starts locally (MLflow, Ray Serve, Ray's agents, tests).

Everything binds 127.0.0.1 only; nothing here listens on another interface.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to right now (the OS picks it; free until someone binds it)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as probe:
        return probe.connect_ex((LOOPBACK, port)) != 0
