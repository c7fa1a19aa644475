"""Gradient clipping by the true global norm: across tp and dp (DTensor) and all pp stages."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from parallel.dtensor import local_part


def _copies(grad: torch.Tensor, world: int, stages: int) -> int:
    """How many ranks hold the same local values of this gradient: a stage's ranks (world /
    stages) divided by the ways the DTensor is sharded; replicas over dp or tp hold copies."""
    shards = 1
    if isinstance(grad, DTensor):
        # Shard and _StridedShard (FSDP over TP) split it; Replicate copies it (Partial: reduced first)
        shards = math.prod(
            grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if not p.is_replicate()
        )
    return world // (stages * shards)


@torch.no_grad()
def clip_grad_norm(
    params: Sequence[torch.Tensor],
    max_norm: float,
    mesh: DeviceMesh,
    tied: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Clip in place and return the global L2 norm of all gradients of the whole model.

    tied: the parameters among `params` that are one of two copies of the same matrix (a tied
    embedding and head on different stages, gradients already summed): counted once, clipped alike.

    One all-reduce over all ranks: each rank adds the squares of its local shards, each divided by
    the number of ranks holding the same values, so every element counts once. Written by hand:
    torch's get_total_norm reduces DTensors placed on different meshes separately (TP-sharded
    linears on (dp, tp), norms on dp only), with one collective per mesh dim, plus one over pp.
    """
    world, stages = mesh.size(), mesh["pp"].size()
    by_copies: dict[int, list[torch.Tensor]] = defaultdict(list)
    twice = {id(p) for p in tied}
    grads = [p.grad for p in params if p.grad is not None]
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            # a pending sum (SP's norm weights without dp keep one): reduce it before squaring
            g = g.redistribute(
                placements=[Replicate() if pl.is_partial() else pl for pl in g.placements]
            )
        by_copies[_copies(g, world, stages) * (2 if id(p) in twice else 1)].append(local_part(g))
    device = local_part(grads[0]).device if grads else torch.device("cpu")
    total_sq = torch.zeros((), device=device, dtype=torch.float32)
    for copies, group in by_copies.items():
        norms = torch._foreach_norm(group)
        total_sq += torch.stack([n.float() for n in norms]).square().sum() / copies
    if world > 1:
        dist.all_reduce(total_sq)  # the one collective: every element's square, counted once
    total = total_sq.sqrt()
    if max_norm > 0:
        # scale the local shards directly: torch's clip_grads_with_norm_ cannot mix meshes either
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([local_part(g) for g in grads], coef)
    return total
