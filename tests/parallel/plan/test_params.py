"""Per-stage parameter counts on the meta device (the exact match with real multi-rank runs is
in tests/launcher/test_plan.py)."""

import torch

from models.llama import ModelArgs, Transformer
from parallel.pipeline.runtime import layers_per_stage
from parallel.plan.params import StageCounter

ARGS = ModelArgs(dim=64, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32)


def test_whole_model_and_any_split_add_up_to_the_model() -> None:
    counter = StageCounter(ARGS)
    with torch.device("meta"):
        total = sum(p.numel() for p in Transformer(ARGS).parameters())
    assert counter.whole().total == total
    for n_stages in (2, 4, 5, 8, 10):
        counts = layers_per_stage(ARGS.n_layers, n_stages)
        assert sum(counter.stage(s, counts, 1).total for s in range(n_stages)) == total, counts
    ends = counter.stage(0, [0, 8, 0], 1).total + counter.stage(2, [0, 8, 0], 1).total
    assert counter.stage(0, [0, 8, 0], 1).embedding == ARGS.vocab_size * ARGS.dim
    assert ends == 2 * ARGS.vocab_size * ARGS.dim + ARGS.dim  # embedding; norm + head


def test_tensor_parallel_shards_what_the_plan_shards() -> None:
    counter = StageCounter(ARGS)
    one, four = counter.whole(1), counter.whole(4)
    norms = (2 * ARGS.n_layers + 1) * ARGS.dim  # RMSNorm weights are not in the plan: replicated
    assert four.total == (one.total - norms) // 4 + norms
    assert four.sharded(2) < four.total and four.sharded(1) == four.total


def test_qwen3_moe_30b_a3b_totals_are_the_published_ones() -> None:
    from launcher.run.compose import compose_config
    from models.qwen3_moe import SPEC
    from parallel.plan.params import active_expert_share, active_parameters

    args = compose_config(["model=qwen3_moe_30b_a3b"]).model
    whole = StageCounter(args).whole()
    share = active_expert_share(args)
    assert share == 8 / 128  # top 8 of 128 experts
    assert whole.total == SPEC.parameter_count(args) and round(whole.total / 1e9, 1) == 30.5
    assert whole.active(share) == active_parameters(args) == SPEC.active_parameter_count(args)
    assert round(whole.active(share) / 1e9, 2) == 3.35
    # 48 layers x 128 experts x 3 matrices of 2048 x 768
    assert whole.experts == 48 * 128 * 3 * 2048 * 768 == whole.experts_held(1)
    assert whole.block_experts == 128 * 3 * 2048 * 768
    assert whole.experts_held(8) * 8 == whole.experts


def test_tensor_parallel_leaves_the_moe_whole() -> None:
    from launcher.run.compose import compose_config

    args = compose_config(["model=qwen3_moe_debug"]).model
    counter = StageCounter(args)
    one, two = counter.whole(1), counter.whole(2)
    router = args.n_layers * args.dim * args.n_experts
    assert one.experts == two.experts == two.replicated_experts == 4 * 8 * 3 * 64 * 32
    assert two.replicated_moe == router  # no shared expert in this flavor
    assert one.total - two.total > 0  # attention is sharded, the MoE is not
    # FSDP shards the experts with the rest unless expert parallelism takes them
    assert one.sharded(2) - one.sharded(2, experts=False) == one.experts // 2
