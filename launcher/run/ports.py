"""A free TCP port on this machine, for local process groups (tests, benchmarks, local sweeps)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now. Another process may take it before it is bound, so
    callers that start a rendezvous on it retry with a new one when it is taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
