"""Training end to end: the loss falls; dp=2 on real gloo ranks equals one process."""

import torch

from tests.helpers.run_training import train_and_report
from tests.helpers.spawn import run_ranks

BASE = [
    "model=debug",
    "train.steps=4",
    "train.global_batch_size=8",
    "train.seq_len=32",
    "train.sample_tokens=0",
    "optim.warmup_steps=1",
    "device=cpu",
]


def test_loss_falls_on_default_corpus() -> None:
    losses, _ = train_and_report(
        ["model=debug", "train.steps=40", "train.seq_len=64", "train.sample_tokens=0"], 1
    )
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_dp2_equals_one_process() -> None:
    ref_losses, ref_weights = train_and_report(BASE + ["parallel.microbatches=2"], 1)
    for dp_shard in ("true", "false"):
        results = run_ranks(
            2, train_and_report, BASE + ["parallel.dp=2", f"parallel.dp_shard={dp_shard}"], 2
        )
        for losses, weights in results:
            torch.testing.assert_close(
                torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0
            )
            for name, ref in ref_weights.items():
                torch.testing.assert_close(weights[name], ref, rtol=1e-5, atol=1e-6, msg=name)
