"""Checks against the machine, before any process group starts or any tensor is allocated:
the model's state must fit a rank's memory."""

from __future__ import annotations

import os

import torch

from launcher.config import Config, ConfigError
from models.registry import parameter_count
from parallel.plan.params import routed_expert_parameters

GIB = 2**30
# fp32 weight and gradient, AdamW's two fp32 moments: what every parameter costs at least
BYTES_PER_PARAMETER = {"weights": 4, "gradients": 4, "optimizer": 8}


def rank_memory_bytes(device: str, ranks_per_node: int) -> int:
    """Memory one rank may use: its GPU's, or this node's RAM shared by its ranks (CPU)."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_per_node)


def state_bytes_per_rank(cfg: Config) -> float:
    """A lower bound of one rank's model state: its pp x tp share of every parameter's weight and
    gradient, and of its optimizer state also divided by FSDP's shard group, dp x cp (within a
    replica group under HSDP) (activations come on top). A MoE's routed experts are whole on
    every TP rank: their share is 1/pp, or 1/(pp x ep) under expert parallelism, which leaves
    them unsharded by FSDP."""
    par = cfg.parallel
    experts = routed_expert_parameters(cfg.model)
    b = BYTES_PER_PARAMETER
    shard = par.dp * par.cp // par.dp_replicate if par.dp_shard else 1
    rest = (parameter_count(cfg.model) - experts) / (par.pp * par.tp)
    expert_share = experts / (par.pp * par.ep)
    expert_shard = shard if par.ep == 1 else 1
    return rest * (b["weights"] + b["gradients"] + b["optimizer"] / shard) + expert_share * (
        b["weights"] + b["gradients"] + b["optimizer"] / expert_shard
    )


def check_fits_machine(cfg: Config, ranks_per_node: int, available: int | None = None) -> None:
    """Refuse a model whose state alone cannot fit a rank, naming the numbers and the fixes."""
    available = rank_memory_bytes(cfg.device, ranks_per_node) if available is None else available
    need = state_bytes_per_rank(cfg)
    if need <= available:
        return
    par = cfg.parallel
    raise ConfigError(
        "model",
        cfg.model.name,
        f"{parameter_count(cfg.model) / 1e9:.2f}B parameters need at least {need / GIB:,.1f} GiB per "
        f"rank for fp32 weights, gradients and AdamW state at pp={par.pp} tp={par.tp} dp={par.dp}"
        f"{f' ep={par.ep}' if par.ep > 1 else ''}, but a rank has {available / GIB:,.1f} GiB; use "
        "a smaller model flavor or size, raise parallel.pp or parallel.tp"
        f"{' (or parallel.ep for the experts)' if routed_expert_parameters(cfg.model) else ''}, "
        "or shard the optimizer over more dp (parallel.dp_shard=true)",
    )
