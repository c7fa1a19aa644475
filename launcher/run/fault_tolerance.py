"""fault_tolerance.* in a run: its checks (before any process group), the group's own layout,
and the ReplicaGroup (parallel/fault_tolerance.py) built from a Trainer's parts."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from launcher.config import Config, ConfigError
from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.storage import Location

if TYPE_CHECKING:  # torchft is an optional extra: imported only by a run that enables it
    from launcher.run.trainer import Trainer
    from parallel.fault_tolerance import ReplicaGroup

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
MISSING_BATCH = ("shrink",)
CONNECT_TIMEOUT_S = 3.0


def lighthouse_address(cfg: Config) -> str | None:
    """fault_tolerance.lighthouse, else $TORCHFT_LIGHTHOUSE (what ft_local and Slurm set)."""
    return cfg.fault_tolerance.lighthouse or os.environ.get(LIGHTHOUSE_ENV) or None


def check_lighthouse(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the lighthouse opens, else why not (one line)."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        return "is not http://host:port"
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"unreachable ({err.strerror or err})"


def validate_fault_tolerance(cfg: Config) -> None:
    """Refuse a fault_tolerance section that cannot work; the lighthouse must answer now."""
    ft, par = cfg.fault_tolerance, cfg.parallel
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("fault_tolerance.enable", True, "needs torchft: pip install -e '.[ft]'")
    if par.dp_replicate < 2:
        raise ConfigError(
            "parallel.dp_replicate",
            par.dp_replicate,
            "fault tolerance manages HSDP's replica groups: set parallel.dp_replicate to the "
            "number of replica groups (>= 2), with parallel.dp = groups x ranks per group",
        )
    groups = par.dp_replicate
    if ft.group_size is not None and ft.group_size != groups:
        raise ConfigError(
            "fault_tolerance.group_size",
            ft.group_size,
            f"must equal parallel.dp_replicate={groups} (the replica groups); or leave it null",
        )
    if not 0 <= ft.replica_id < groups:
        raise ConfigError(
            "fault_tolerance.replica_id", ft.replica_id, f"must be in [0, {groups - 1}]"
        )
    if not 1 <= ft.min_replicas <= groups:
        raise ConfigError(
            "fault_tolerance.min_replicas",
            ft.min_replicas,
            f"must be in [1, {groups}]: more than the {groups} replica groups "
            "(parallel.dp_replicate) could never commit a step",
        )
    if ft.missing_batch not in MISSING_BATCH:
        raise ConfigError(
            "fault_tolerance.missing_batch",
            ft.missing_batch,
            "only shrink is implemented (the live groups' slices make the step)",
        )
    if not ft.timeout_s > 0:
        raise ConfigError("fault_tolerance.timeout_s", ft.timeout_s, "must be > 0, e.g. 30")
    if par.timeline or par.schedule in ("zbv", "zb_1p", "zb_2p"):
        raise ConfigError(
            "fault_tolerance.enable",
            True,
            "not with parallel.timeline or a searched order (zbv, zb_1p, zb_2p): their "
            "measured steps bypass the quorum; pick another schedule",
        )
    address = lighthouse_address(cfg)
    if address is None:
        raise ConfigError(
            "fault_tolerance.lighthouse",
            None,
            f"give the lighthouse's http://host:port (or set ${LIGHTHOUSE_ENV}); start one with "
            "`torchft_lighthouse --min_replicas 1` or use python -m launcher.ft_local",
        )
    why = check_lighthouse(address)
    if why is not None:
        raise ConfigError(
            "fault_tolerance.lighthouse",
            address,
            f"{why}; start the lighthouse first (torchft_lighthouse) or fix the address",
        )


def quiet_torchft() -> None:
    """torchft's Rust side logs every quorum and commit at INFO; keep its warnings and errors
    unless the user asked for more (RUST_LOG=info). Read once, when torchft starts logging."""
    os.environ.setdefault("RUST_LOG", "warn")
    if os.environ["RUST_LOG"] == "warn":  # its Python loggers too (Hydra's root logs INFO)
        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.WARNING)


def group_dp(cfg: Config) -> int:
    """dp ranks inside this torch world: one replica group's under fault tolerance, else all."""
    par = cfg.parallel
    return par.dp // par.dp_replicate if cfg.fault_tolerance.enable else par.dp


def dp_offset(cfg: Config) -> int:
    """This group's first global dp rank: its replica id's slice of every global batch."""
    return cfg.fault_tolerance.replica_id * group_dp(cfg) if cfg.fault_tolerance.enable else 0


def replica_root(cfg: Config, root: Location) -> Location:
    """Each replica group keeps its own checkpoints (its shards; they differ only in the data
    slice they were saved by), under replica-<id> of a shared checkpoint.dir."""
    if not cfg.fault_tolerance.enable:
        return root
    return storage_for(root).join(root, f"replica-{cfg.fault_tolerance.replica_id}")


def replica_group(cfg: Config, trainer: Trainer) -> ReplicaGroup:
    """This rank's ReplicaGroup over the trainer's chunks, optimizer, sampler and LR schedule."""
    quiet_torchft()
    from parallel.fault_tolerance import ReplicaGroup, ReplicaParts

    def set_step(step: int) -> None:
        trainer.step = step

    parts = ReplicaParts(
        modules=list(trainer.model.chunks),
        optimizer=trainer.optimizer,
        states={"sampler": trainer.sampler, "lr_scheduler": trainer.lr_scheduler},
        get_step=lambda: trainer.step,
        set_step=set_step,
    )
    ft = cfg.fault_tolerance
    address = lighthouse_address(cfg)
    assert address is not None  # validated
    return ReplicaGroup(parts, ft.replica_id, ft.min_replicas, address, ft.timeout_s)
