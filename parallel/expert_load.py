"""Expert load balance for the metrics: how many tokens each layer's router sent to each expert
since the last read, summed over all ranks, and the mean auxiliary loss (one collective)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from models.moe import MoE


@torch.no_grad()
def expert_load(chunks: Sequence[nn.Module], n_layers: int, n_experts: int) -> dict[str, float]:
    """moe/load_max_over_mean (the busiest expert's tokens over the mean, in the worst layer; 1
    is balanced), moe/load_min_over_mean and moe/aux_loss (per layer and forward, summed over
    layers) since the last call, then resets the counts. A collective over all ranks: each
    holds its stages' layers."""
    device = next(p.device for c in chunks for p in c.parameters())
    table = torch.zeros(n_layers, n_experts + 2, device=device)  # counts, aux mean, ranks
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if isinstance(m, MoE) and m.load is not None and m.aux_sum is not None:
                layer = int(name.split(".")[1])  # layers.<i>.feed_forward
                table[layer, :n_experts] = m.load.float()
                table[layer, n_experts] = m.aux_sum / max(m.forwards, 1)
                table[layer, n_experts + 1] = 1.0
    reset_expert_load(chunks)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    counts = table[:, :n_experts]
    mean = counts.mean(1).clamp(min=1e-9)
    aux = table[:, n_experts] / table[:, n_experts + 1].clamp(min=1)
    return {
        "moe/load_max_over_mean": (counts.max(1).values / mean).max().item(),
        "moe/load_min_over_mean": (counts.min(1).values / mean).min().item(),
        "moe/aux_loss": aux.sum().item(),
    }


def reset_expert_load(chunks: Sequence[nn.Module]) -> None:
    """Forget the counts so far (no collective): e.g. those of a pipeline's first step, where
    torch's metadata inference runs each stage once more on placeholder (uninitialized) inputs."""
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, MoE) and m.load is not None and m.aux_sum is not None:
                m.load.zero_()
                m.aux_sum.zero_()
                m.forwards = 0
