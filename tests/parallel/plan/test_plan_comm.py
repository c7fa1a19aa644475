"""parallel.plan.comm's expert parallelism: the all-to-all and the experts' gradient all-reduce,
worked out by hand for a tiny case (the TP counts are checked against a real run in
tests/launcher/test_plan.py)."""

from __future__ import annotations

import pytest

from launcher.run.compose import compose_config
from parallel.plan.comm import all_to_all_bytes, ep_bytes, expert_gradient_bytes
from parallel.plan.estimate import estimate
from parallel.plan.layout import Cluster, Layout, RankContext
from parallel.plan.params import StageCounter

CLUSTER = Cluster(1, 8, 80, 450, 50, 989)


def test_all_to_all_bytes_worked_out_by_hand() -> None:
    # 32 tokens x top 2 = 64 rows of 64 elements, 3/4 of them sent to the other 3 of ep=4;
    # 4 all-to-alls (dispatch, combine, both again in backward) x 2 MoE layers x 2 microbatches
    one = 64 * 3 / 4 * 64 * 2  # bytes of one all-to-all in bf16: 6144
    got = all_to_all_bytes(tokens=32, dim=64, top_k=2, ep=4, moe_layers=2, microbatches=2)
    assert got == 16 * one == 98304
    # recompute runs the forward's two again; fp32 doubles it; ep=1 or a dense block sends none
    assert (
        all_to_all_bytes(
            tokens=32, dim=64, top_k=2, ep=4, moe_layers=2, microbatches=2, recompute="full"
        )
        == 24 * one
    )
    assert (
        all_to_all_bytes(
            tokens=32, dim=64, top_k=2, ep=4, moe_layers=2, microbatches=2, dtype_bytes=4
        )
        == 2 * got
    )
    assert all_to_all_bytes(tokens=32, dim=64, top_k=2, ep=1, moe_layers=2) == 0
    assert all_to_all_bytes(tokens=32, dim=64, top_k=2, ep=4, moe_layers=0) == 0


def test_expert_gradient_all_reduce_by_hand() -> None:
    # 1000 fp32 gradients all-reduced over 2 GPUs: a ring moves 2(n-1)/n = 1 of them per GPU
    assert expert_gradient_bytes(1000, replicas=2) == 4000
    assert expert_gradient_bytes(1000, replicas=4) == 6000
    assert expert_gradient_bytes(1000, replicas=1) == 0


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_the_plan_counts_ep_traffic_per_pipeline_rank(ep: int) -> None:
    # qwen3_moe_debug: dim 64, top 2 of 8 experts of width 32, 4 layers, 2 per pipeline stage;
    # dp=4: 8 sequences of 32 tokens in 2 microbatches is 32 tokens per GPU and microbatch
    args = compose_config(["model=qwen3_moe_debug"]).model
    layout = Layout(dp=4, pp=2, tp=1, virtual_stages=1, schedule="1f1b", microbatches=2, ep=ep)
    plan = estimate(
        args, layout, CLUSTER, global_batch_size=8, seq_len=32, counter=StageCounter(args)
    )
    dense = estimate(
        args,
        Layout(dp=4, pp=2, tp=1, virtual_stages=1, schedule="1f1b", microbatches=2),
        CLUSTER,
        global_batch_size=8,
        seq_len=32,
        counter=StageCounter(args),
    )
    experts = 2 * 8 * 3 * 64 * 32 // ep  # a stage's 2 layers of experts, split over ep
    for r, d in zip(plan.ranks, dense.ranks, strict=True):
        rank = RankContext(args=args, tokens=32, microbatches=2, layers=2, ep=ep)
        assert r.ep_bytes == ep_bytes(rank) == {1: 0, 2: 65536, 4: 98304}[ep]
        assert r.experts == (experts if ep > 1 else 2 * 8 * 3 * 64 * 32)
        # the experts' fp32 gradients, all-reduced over the 4/ep GPUs holding the same ones
        assert r.expert_dp_bytes == {1: 0, 2: 4 * experts, 4: 0}[ep]
        assert r.model_flops == d.model_flops  # balanced routing: EP moves work, adds none
        if ep > 1:
            assert r.comm_s > d.comm_s
