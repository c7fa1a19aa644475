"""Tied input embedding and output head across pipeline stages (Megatron's embedding group).

Stage 0 holds the embedding and the last stage the head; with tied embeddings both are the same
matrix, so each stage keeps its own copy, both start from the same values (parallel/init.py
draws the head's copy under the embedding's name), and once per step, before clipping, the two
copies' gradients are summed: every rank then applies the same update to the same values. On
V-shaped placements both stages sit on one rank and the sum is local; otherwise the ranks of
pipeline rank 0 and of the last stage's rank with the same (dp, cp, tp) coordinates sum over a
two-rank group. Written by hand: torch has no tied-parameter support across pipeline stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from models.decoder import Decoder
from parallel.dtensor import local_part


@dataclass
class TiedCopies:
    """This rank's copies of the tied matrix and the group it sums their gradients over."""

    params: list[torch.Tensor]  # the embedding's and/or the head's weight held here
    group: dist.ProcessGroup | None  # None: both copies are on this rank


def tie_across_stages(
    chunks: Sequence[Decoder], last_stage_rank: int, mesh: DeviceMesh
) -> TiedCopies | None:
    """The tied copies of this rank, after making the groups that sum them (a collective on
    every rank: each group is created by all); None on ranks that hold neither copy."""
    group = None
    if last_stage_rank != 0:
        # global ranks, one row per coordinate of the other dims (dp, cp, tp), along pp
        pp_dim = (mesh.mesh_dim_names or ()).index("pp")
        rows = mesh.mesh.movedim(pp_dim, -1).reshape(-1, mesh.mesh.shape[pp_dim])
        me = dist.get_rank()
        for row in rows:
            pair = [int(row[0]), int(row[last_stage_rank])]
            made = dist.new_group(pair)  # new_group: every rank must call it, in order
            if me in pair:
                group = made
    params = [
        p
        for chunk in chunks
        for p in (
            chunk.tok_embeddings.weight if chunk.tok_embeddings is not None else None,
            chunk.output.weight if chunk.output is not None else None,
        )
        if p is not None
    ]
    return TiedCopies(params, group) if params else None


@torch.no_grad()
def sum_tied_gradients(tied: TiedCopies) -> None:
    """Give every copy of the tied matrix the sum of the copies' gradients (no host sync)."""
    for p in tied.params:
        if (
            isinstance(p, DTensor)
            and isinstance(p.grad, DTensor)
            and p.grad.placements != p.placements
        ):
            # TP without FSDP2 can leave a gradient laid out unlike its weight (the embedding's
            # under SP): lay it out as the weight is, so both copies hold the same elements
            p.grad = p.grad.redistribute(placements=p.placements)
    grads = [local_part(p.grad) for p in tied.params if p.grad is not None]
    if not grads:
        return
    total = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
    if tied.group is not None:
        # the one collective: the embedding's and the head's gradient shards, same elements
        dist.all_reduce(total, group=tied.group)
    for g in grads:
        if g is not total:
            g.copy_(total)
