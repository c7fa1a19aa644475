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
