"""Gradient clipping by the true global norm: across tp and dp (DTensor) and all pp stages."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.dtensor import full_value, local_part


@torch.no_grad()
def clip_grad_norm(
    params: Sequence[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Clip in place and return the global L2 norm of all gradients of the whole model."""
    grads = [p.grad for p in params if p.grad is not None]
    # torch's get_total_norm cannot stack norms of DTensors on different meshes (TP-sharded
    # linears live on (dp, tp), replicated norms on dp only), so reduce each group separately.
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group)
        squares.append(full_value(norm) ** 2)
    total_sq = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)  # each pp rank holds only its stages' grads
    total = total_sq.sqrt()
    if max_norm > 0:
        # scale the local shards directly: torch's clip_grads_with_norm_ cannot mix meshes either
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([local_part(g) for g in grads], coef)
    return total
