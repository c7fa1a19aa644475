"""optim.implementation: for_loop, foreach and fused AdamW give the same losses (fp32), on plain
and on DTensor (TP) parameters; auto picks fused for CPU floats."""

from __future__ import annotations

import torch

from launcher.run.trainer import adamw_implementation
from tests.helpers.run_training import train_and_report
from tests.helpers.spawn import run_ranks

BASE = [
    "model=debug",
    "train.steps=3",
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.eps=1e-5",  # as tests/parallel/test_parity.py: rounding noise must not flip updates
    "precision=fp32",
    "device=cpu",
]
IMPLEMENTATIONS = ("for_loop", "foreach", "fused")  # auto: test_auto_is_fused_for_cpu_floats


def _losses(world: int) -> list[list[float]]:
    return [
        train_and_report([*BASE, f"optim.implementation={i}"], world)[0] for i in IMPLEMENTATIONS
    ]


def test_implementations_give_the_same_losses() -> None:
    for cases in (run_ranks(1, _losses, 1)[0], *run_ranks(2, _losses_tp)):
        reference = cases[0]
        for losses in cases[1:]:
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            assert rel <= 1e-5, (losses, reference)


def _losses_tp() -> list[list[float]]:
    # DTensor parameters (TP shards): the fused and foreach kernels must take them too
    return [
        train_and_report([*BASE, "parallel.tp=2", f"optim.implementation={i}"], 2)[0]
        for i in IMPLEMENTATIONS
    ]


def test_auto_is_fused_for_cpu_floats() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw_implementation("auto", params) == "fused"
    assert adamw_implementation("foreach", params) == "foreach"
    assert adamw_implementation("auto", [torch.nn.Parameter(torch.zeros(2, device="meta"))]) == (
        "foreach"
    )
