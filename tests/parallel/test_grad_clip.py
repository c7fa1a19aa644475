"""Clipping by the global norm on a bare (dp, pp, tp) mesh equals one process's clipping."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from parallel.dtensor import full_value
from parallel.grad_clip import clip_grad_norm
from tests.helpers.spawn import run_on_mesh

MAX_NORM = 0.05


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


def _clipped(mesh: DeviceMesh | None) -> tuple[float, list[torch.Tensor]]:
    model = _model()
    if mesh is not None:  # mesh is None: the one-process reference
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    norm = clip_grad_norm(list(model.parameters()), MAX_NORM, None)
    return norm.item(), [full_value(p.grad).detach().clone() for p in model.parameters()]


def test_tp_sharded_gradients_clip_like_one_process() -> None:
    ref_norm, ref_grads = _clipped(None)
    plain = _model()
    plain(torch.randn(4, 8, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    assert (
        abs(torch.nn.utils.clip_grad_norm_(plain.parameters(), MAX_NORM).item() - ref_norm) < 1e-6
    )
    for norm, grads in run_on_mesh((2, 1, 2), _clipped):
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm and ref_norm > MAX_NORM  # clipping did act
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
