"""Local sweeps: under `python -m launcher.train -m ...` each job runs as its own worker group.

Hydra's basic launcher runs the jobs one after another in this process; a job whose mesh has
more than one rank starts dp*pp*cp*tp local ranks through torch's elastic launch API (what
torchrun uses), each training on the job's composed config and writing to the job's folder.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from pathlib import Path

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from launcher.config import Config
from launcher.run.ports import free_port

# Ranks fork from one server process that imported torch and the training loop once per sweep,
# instead of every rank of every job importing them again (~5 s of CPU per rank on small
# machines). The server is a fresh interpreter (not a fork of this one), started by the first job.
PRELOAD = ["torch", "launcher.run.loop"]


def run_worker_group(cfg: Config, run_dir: Path) -> float | None:
    """Train `cfg` on dp*pp*cp*tp local ranks; returns the last step's loss (None if no step ran)."""
    world = cfg.parallel.world_size
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        run_id=f"sweep-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="forkserver",
    )
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    return elastic_launch(config, run_rank)(cfg, str(run_dir))[0]  # local rank 0 = global rank 0


def run_rank(cfg: Config, run_dir: str) -> float | None:
    """One rank of a sweep job: the same training `python -m launcher.train` runs under torchrun."""
    import torch
    import torch.distributed as dist

    from launcher.run.build import load_data
    from launcher.run.loop import train

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as torchrun does when it starts several ranks on one machine
    try:
        summary = train(cfg, load_data(cfg), Path(run_dir))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return summary.losses[-1] if summary.losses else None
