"""The training loss: token-mean cross-entropy, vocab-parallel when the logits are TP-sharded,
and the global weight that keeps it a mean over the counted tokens when some targets are masked."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from data.documents import IGNORE_INDEX
from parallel.dtensor import local_part


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one (micro)batch in fp32, summed over its counted targets (not
    IGNORE_INDEX) and divided by all its token slots: the token mean when every target counts
    (the same bits as reduction="mean"); counted_token_weight turns it into the mean over the
    counted tokens of the global batch when some do not."""
    flat = targets.flatten(0, 1)
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / flat.numel()


def counted_token_weight(targets: torch.Tensor, dp_mesh: DeviceMesh) -> torch.Tensor:
    """Token slots / counted targets of the global batch, given this dp rank's whole [b, s]
    targets: the factor that turns cross_entropy's per-slot sums, averaged as usual over
    microbatches and dp·cp ranks, into the mean over the counted tokens (as one process)."""
    counted = (targets != IGNORE_INDEX).sum()
    dp = dp_mesh.size()
    if dp > 1:
        # one collective per step, no host sync: the count of the other dp ranks' batches (cp,
        # tp and pp ranks of a dp rank hold the same whole batch)
        dist.all_reduce(counted, group=dp_mesh.get_group())
    return (targets.numel() * dp) / counted.clamp(min=1).double()


@torch.no_grad()
def scale_gradients(params: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
    """Multiply every gradient (its local shard) by a scalar tensor, in place."""
    grads = [local_part(p.grad) for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, weight.to(grads[0].dtype))


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Under TP the logits are a DTensor sharded by vocabulary; loss_parallel computes the
    softmax across shards without gathering them. It must cover the backward too."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
