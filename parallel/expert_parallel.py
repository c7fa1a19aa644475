"""Expert parallelism: a MoE model's routed experts split over `ep` ranks borrowed from dp x cp
(as TorchTitan borrows them), tokens sent to their experts' ranks and back by all-to-all.

Each rank of an ep group holds n_experts / ep consecutive experts (a DTensor sharded on dim 0
over the ep mesh, so checkpoints record the whole stacked tensor and any ep can load it). The
MoE's `dispatch` submodule (models/moe.py) is swapped for `ExpertParallelDispatch`, which sends
the rows sorted by expert to the ranks owning those experts (all-to-all with uneven splits, gloo
and NCCL alike), regroups what arrived by local expert, runs the local experts' grouped matmuls
and sends the outputs back in the same order. torch's functional all-to-all carries the
gradient back through both exchanges.

The experts' gradients are not FSDP's: FSDP2 ignores those parameters, and `ExpertGradients`
sums them over the ranks holding the same experts (dp x cp / ep of them) and divides by dp x cp,
so the update equals one process's. The split sizes of an all-to-all must be known on the
host: dispatch reads them once per MoE layer and microbatch (the one host sync dropless expert
parallelism needs, in Megatron-Core and TorchTitan alike).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.moe import GroupedExperts, grouped_swiglu, moe_modules

EXPERT_WEIGHTS = ("w1", "w2", "w3")


def expert_mesh(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """dp x cp flattened and split into (dp_cp_mod_ep, ep): ep groups of neighbouring ranks,
    and across them the ranks that hold the same experts."""
    flat = mesh["dp", "cp"]._flatten("dp_cp")
    return flat._unflatten(0, (flat.size() // ep, ep), ("dp_cp_mod_ep", "ep"))


class ExpertParallelDispatch(nn.Module):
    """Sorted rows to their experts' ranks, the local experts, the outputs back (all-to-all)."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        super().__init__()
        self.group, self.ep = group, ep
        self.rank = dist.get_rank(group)
        self.rows_sent = 0  # token rows this rank sent to other ranks in dispatch (host ints)

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        """x [n, dim] sorted by (global) expert, counts [E] -> the experts' outputs, same order."""
        ep, local = self.ep, counts.numel() // self.ep
        # rows each rank sends here, per source rank and local expert
        received = funcol.all_to_all_single(counts, None, None, self.group).view(ep, local)
        send, recv = torch.stack([counts.view(ep, local).sum(1), received.sum(1)]).tolist()
        self.rows_sent += sum(send) - send[self.rank]
        arrived = funcol.all_to_all_single_autograd(x, recv, send, self.group)
        # arrived rows are grouped by (source rank, expert); the grouped matmul wants (expert, rank)
        segment = torch.repeat_interleave(
            torch.arange(ep * local, device=x.device), received.flatten(), output_size=sum(recv)
        )
        order = ((segment % local) * ep + segment // local).argsort(stable=True)
        weights = (getattr(experts, w) for w in EXPERT_WEIGHTS)
        out = grouped_swiglu(
            arrived[order],
            received.sum(0),
            *(w.to_local() if isinstance(w, DTensor) else w for w in weights),
        )
        return funcol.all_to_all_single_autograd(out[order.argsort()], send, recv, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Parameter]:
    """Shard every MoE's routed experts over `ep_mesh` (dim 0, before materialization) and swap in
    the all-to-all dispatch; returns the expert parameters (for FSDP to leave alone)."""
    ep = ep_mesh.size()
    params = []
    for moe in moe_modules(model):
        if moe.n_experts % ep:
            raise ValueError(f"{moe.n_experts} experts do not split over ep={ep} ranks")
        for name in EXPERT_WEIGHTS:
            sharded = nn.Parameter(
                distribute_tensor(getattr(moe.experts, name), ep_mesh, [Shard(0)])
            )
            setattr(moe.experts, name, sharded)
            params.append(sharded)
        moe.dispatch = ExpertParallelDispatch(ep_mesh.get_group(), ep)
    return params


class ExpertGradients:
    """The expert parameters' gradient reduction, FSDP's job for every other parameter."""

    def __init__(self, params: list[nn.Parameter], replicas: DeviceMesh, dp_cp: int) -> None:
        """replicas: the mesh dim over the ranks holding the same experts; dp_cp: the ranks
        gradients are averaged over (dp x cp)."""
        self.params, self.dp_cp = params, dp_cp
        self.group = replicas.get_group() if replicas.size() > 1 else None

    @torch.no_grad()
    def reduce(self) -> None:
        """Sum over the replicas (one all-reduce of all expert gradients), divide by dp x cp."""
        grads = [
            p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            for p in self.params
            if p.grad is not None
        ]
        if not grads:
            return
        if self.group is not None:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.group)
            torch._foreach_copy_(
                grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
            )
        torch._foreach_div_(grads, float(self.dp_cp))
