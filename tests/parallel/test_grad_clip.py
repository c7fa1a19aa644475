"""Clipping by the global norm on a bare (dp, pp, tp) mesh equals one process's clipping."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from parallel.dtensor import full_value
from parallel.grad_clip import clip_grad_norm
from tests.helpers.spawn import run_on_mesh

MAX_NORM = 0.05


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def _input() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _clipped(mesh: DeviceMesh, fsdp: bool) -> tuple[float, list[torch.Tensor]]:
    """TP over mesh["tp"] (a sharded and a replicated bias), optionally FSDP2 over mesh["dp"]."""
    model = _model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    if fsdp:
        fully_shard(model, mesh=mesh["dp"])
    model(_input()).pow(2).sum().backward()
    norm = clip_grad_norm(list(model.parameters()), MAX_NORM, mesh)
    return norm.item(), [full_value(p.grad).detach().clone() for p in model.parameters()]


def _both(mesh: DeviceMesh) -> list[tuple[float, list[torch.Tensor]]]:
    return [_clipped(mesh, fsdp=False), _clipped(mesh, fsdp=True)]  # one spawn for both layouts


def test_sharded_and_replicated_gradients_clip_like_one_process() -> None:
    """TP alone (dp ranks hold copies) and FSDP2 over TP (_StridedShard x Shard)."""
    plain = _model()
    plain(_input()).pow(2).sum().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), MAX_NORM).item()
    assert ref_norm > MAX_NORM  # clipping does act
    for per_layout in run_on_mesh((2, 1, 2), _both):
        for norm, grads in per_layout:
            assert abs(norm - ref_norm) <= 1e-5 * ref_norm
            for g, p in zip(grads, plain.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
