"""precision=bf16 under FSDP2 is TorchTitan's MixedPrecisionPolicy: parameters all-gathered in
bf16 (half the bytes of fp32, as the planner counts them), fp32 master weights, optimizer state
and gradients; it trains on CPU (gloo)."""

from __future__ import annotations

import math

import torch

from launcher.benchmarks.gathered import AllGatherBytes
from launcher.run.build import build_trainer, load_data
from models.registry import parameter_count
from parallel.plan.comm import fsdp_gather_bytes
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

BASE = [
    "model=debug",
    "train.steps=2",
    "train.seq_len=16",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "parallel.dp=2",
    "parallel.microbatches=2",
    "device=cpu",
]


def _one_step(precision: str) -> dict[str, object]:
    cfg = make_config([*BASE, f"precision={precision}"], world_size=2)
    trainer = build_trainer(cfg, load_data(cfg))
    counter = AllGatherBytes()
    with counter:
        result = trainer.train_step()
    optim_dtypes = {
        t.dtype for s in trainer.optimizer.state.values() for t in s.values() if t.ndim > 0
    }
    params = trainer.model.parameters()
    return {
        "loss": result.loss.item(),
        "gathered": counter.bytes * (2 - 1) / 2,  # what a ring all-gather sends per rank
        "param_dtypes": {p.dtype for p in params},
        "optim_dtypes": optim_dtypes,
        "params": parameter_count(cfg.model),
    }


def _both() -> list[dict[str, object]]:
    return [_one_step("fp32"), _one_step("bf16")]


def test_bf16_gathers_half_the_bytes_and_keeps_fp32_master_state() -> None:
    for fp32, bf16 in run_ranks(2, _both):
        for run, weight_bytes in ((fp32, 4), (bf16, 2)):
            expected = fsdp_gather_bytes(
                run["params"], dp=2, pipelined=False, microbatches=2, weight_bytes=weight_bytes
            )
            assert run["gathered"] == expected, (run["gathered"], expected)
            assert run["param_dtypes"] == run["optim_dtypes"] == {torch.float32}
        assert bf16["gathered"] * 2 == fp32["gathered"]
        assert math.isfinite(bf16["loss"]) and abs(bf16["loss"] - fp32["loss"]) < 0.05
