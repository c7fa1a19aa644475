"""The device mesh: dims (dp, pp, cp, tp) with tp innermost, then cp, so a TP group is consecutive
ranks and a CP group the next closest (both prefer fast links)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "pp", "cp", "tp")


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; each rank gets its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(device)


def build_mesh(device: torch.device, dp: int, pp: int, tp: int, cp: int = 1) -> DeviceMesh:
    """Start the process group (nccl on CUDA, gloo on CPU) and build the named 4D mesh.

    HSDP's replica x shard split of dp is not a dim here: parallel/data_parallel.py derives that
    2-D mesh from dp and cp when it wraps the model."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "MASTER_ADDR" not in os.environ:
            # a plain `python -m launcher.train`: a one-rank group over a local file store
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return init_device_mesh(device.type, (dp, pp, cp, tp), mesh_dim_names=MESH_DIMS)
