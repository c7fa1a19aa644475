"""Local process groups (tests, benchmarks): a free TCP port, and the environment of one rank."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now. Another process may take it before it is bound, so
    callers that start a rendezvous on it retry with a new one when it is taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun would set for `rank` of a one-node group of `world` ranks on `port`."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
