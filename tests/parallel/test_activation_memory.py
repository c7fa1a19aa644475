"""Measured activation memory: 1F1B holds at most pp microbatches, GPipe all m; recompute
lowers memory without changing the numbers."""

import torch

from launcher.benchmarks.activation_memory import SavedActivationTracker
from launcher.run.build import build_trainer, load_data
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

BASE = ["model=debug", "train.seq_len=32", "train.sample_tokens=0", "optim.eps=1e-5", "device=cpu"]


def _measure(overrides: list[str], world: int) -> tuple[float, float, int, float]:
    """(loss, microbatches in flight at the peak, peak saved bytes, total saved bytes) for one step."""
    cfg = make_config(BASE + overrides, world)
    trainer = build_trainer(cfg, load_data(cfg))
    with SavedActivationTracker() as tracker:
        result = trainer.train_step()
    loss = trainer.global_mean(result.loss).item()
    in_flight = tracker.peak / (tracker.total / cfg.parallel.microbatches)
    return loss, in_flight, tracker.peak, tracker.total


# zero-bubble schedules: microbatches their order holds at pp=2 (parallel/schedules.py); zb_1p
# runs zb_h1's order at equal costs
ZERO_BUBBLE_LIMITS = {"zb_h1": 2, "zb_h2": 3, "zb_2p": 4, "zbv": 2}
# torch 2.13 keeps part of every microbatch past its weight gradient until the step ends:
# 2.8x the order's count at m=8 (parallel/schedules.py, ZERO_BUBBLE_TORCH_FACTOR)
TORCH_KEEPS = 2.8


def _pipeline_cases(world: int) -> dict[str, tuple]:
    common = ["parallel.pp=2", "parallel.microbatches=8", "train.global_batch_size=16"]
    return {
        s: _measure(
            common + [f"parallel.schedule={s}", f"parallel.virtual_stages={1 + (s == 'zbv')}"],
            world,
        )
        for s in ("gpipe", "1f1b", *ZERO_BUBBLE_LIMITS)
    }


def test_1f1b_holds_at_most_pp_microbatches_gpipe_holds_all() -> None:
    per_rank = run_ranks(2, _pipeline_cases, 2)
    for rank, results in enumerate(per_rank):
        assert results["gpipe"][1] > 0.8 * 8, (rank, results)  # all m microbatches held
        # stage 0 holds pp microbatches (stage 1 one) plus, measured in torch 2.13, part of the
        # one just backpropagated: its graph is released only when its output is dropped
        assert results["1f1b"][1] < 2 - rank + 1, (rank, results)
        assert results["1f1b"][2] < results["gpipe"][2] / 3
    assert per_rank[1]["gpipe"][0] == per_rank[1]["1f1b"][0]  # same loss
    first = per_rank[0]
    for name, limit in ZERO_BUBBLE_LIMITS.items():
        for results in per_rank:
            assert results[name][1] <= TORCH_KEEPS * limit, (name, results[name])
        # tridist's one-stage orders on the first stage, where 1F1B peaks: their count plus part
        # of one (zbv at pp=2, m=8 runs torch's ZB-V order, its search's pick at equal costs,
        # and is held to the bound above only, as torch's zbv was)
        assert name == "zbv" or first[name][1] < limit + 1, (name, first[name])
    assert first["zb_h1"][1] <= first["1f1b"][1] + 0.01  # ZB-H1 keeps 1F1B's peak


def test_recompute_keeps_loss_and_cuts_saved_activations() -> None:
    runs = {
        mode: _measure(["train.global_batch_size=4", f"model.activation_checkpointing={mode}"], 1)
        for mode in ("none", "selective", "full")
    }
    assert runs["none"][0] == runs["selective"][0] == runs["full"][0]
    # selective recompute keeps matmul/attention outputs in its own cache, which autograd's
    # saved-tensor hooks do not see: this measures what autograd itself holds
    assert runs["full"][2] < runs["none"][2] / 5 and runs["selective"][2] < runs["none"][2] / 5, (
        runs
    )
    torch.distributed.destroy_process_group()
