"""The auto pipeline split is optimal: brute force over every contiguous split agrees on small
cases, for one-stage-per-rank, looped and V placements; and the null default's choice."""

import itertools
from collections.abc import Iterator

import pytest

from models.llama import ModelArgs
from parallel.pipeline.registry import pipeline_layout
from parallel.pipeline.split import (
    PartCosts,
    best_split,
    choose_split,
    fit_part_costs,
    objective,
    placement,
    rank_times,
)
from parallel.plan.parts import part_costs

HEAD_HEAVY = ModelArgs(dim=128, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000)
DEBUG = ModelArgs(dim=64, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32)

# block, embedding, head (FLOPs per token), block / head activations: synthetic shapes where
# the ends weigh nothing, a few blocks, or many, so the optimum lands in different places
COSTS = [
    PartCosts(10, 0, 0, 1.0, 0.0),
    PartCosts(10, 3, 25, 1.0, 4.0),
    PartCosts(10, 1, 190, 1.0, 30.0),
    PartCosts(7, 12, 9, 2.0, 1.0),
]
LAYOUTS = [  # pp, virtual stages, schedule
    (2, 1, "1f1b"),
    (3, 1, "1f1b"),
    (4, 1, "gpipe"),
    (2, 2, "interleaved_1f1b"),
    (2, 3, "looped_bfs"),
    (3, 2, "interleaved_zb"),
    (2, 2, "zbv"),
    (3, 2, "dualpipev"),
]


def _every_split(n_layers: int, n_stages: int) -> Iterator[tuple[int, ...]]:
    """Every contiguous split: stages between the ends hold at least one block."""
    for counts in itertools.product(range(n_layers + 1), repeat=n_stages):
        if sum(counts) == n_layers and all(c >= 1 for c in counts[1:-1]):
            yield counts


@pytest.mark.parametrize("pp,v,schedule", LAYOUTS)
def test_auto_split_matches_brute_force(pp: int, v: int, schedule: str) -> None:
    where = placement(pipeline_layout(schedule, pp, v, 8))
    for costs in COSTS + [part_costs(HEAD_HEAVY, 128)]:
        for n_layers in range(max(1, where.n_stages - 2), 8 if where.n_stages <= 4 else 7):
            found = best_split(costs, n_layers, where)
            assert sum(found) == n_layers and all(c >= 1 for c in found[1:-1]), found
            best = min(objective(costs, s, where) for s in _every_split(n_layers, where.n_stages))
            assert objective(costs, found, where) == best, (costs, n_layers, found)


def test_head_heavy_model_moves_blocks_off_the_last_stage() -> None:
    costs, where = part_costs(HEAD_HEAVY, 128), placement(pipeline_layout("1f1b", 4, 1, 8))
    found = best_split(costs, 8, where)
    assert found[-1] == 0  # the head alone outweighs any rank's blocks
    assert max(rank_times(costs, found, where)) < max(rank_times(costs, [2, 2, 2, 2], where))
    # equally fast splits: 1F1B's first rank holds 4 microbatches, so it gets the fewest blocks
    assert found[0] == min(found[:-1])


def test_null_keeps_the_even_split_unless_auto_is_faster() -> None:
    even = choose_split(
        part_costs(DEBUG, 16), DEBUG.n_layers, pipeline_layout("1f1b", 2, 1, 8), None
    )
    assert (even.counts, even.how) == ([4, 4], "even")
    heavy = choose_split(
        part_costs(HEAD_HEAVY, 128), HEAD_HEAVY.n_layers, pipeline_layout("1f1b", 4, 1, 8), None
    )
    assert heavy.how == "auto (default)" and heavy.even == [2, 2, 2, 2]
    assert choose_split(
        part_costs(HEAD_HEAVY, 128), HEAD_HEAVY.n_layers, pipeline_layout("1f1b", 4, 1, 8), "even"
    ).counts == [2, 2, 2, 2]
    assert (
        choose_split(
            part_costs(HEAD_HEAVY, 128),
            HEAD_HEAVY.n_layers,
            pipeline_layout("1f1b", 4, 1, 8),
            [1, 3, 4, 0],
        ).how
        == "explicit"
    )
    # no even split of 7 blocks into 4 stages: null splits automatically, `even` refuses
    odd = ModelArgs(**{**DEBUG.__dict__, "n_layers": 7})
    uneven = choose_split(part_costs(odd, 16), odd.n_layers, pipeline_layout("1f1b", 4, 1, 8), None)
    assert (uneven.how, uneven.even, sum(uneven.counts)) == ("auto (default)", None, 7)
    with pytest.raises(ValueError, match="layers_per_stage"):
        choose_split(part_costs(odd, 16), odd.n_layers, pipeline_layout("1f1b", 4, 1, 8), "even")


def test_measured_stage_times_refit_the_block_and_head() -> None:
    base = part_costs(HEAD_HEAVY, 128)
    # a machine where a block takes 3 ms and the head 30 ms (the FLOPs say ~19 blocks)
    counts = [2, 2, 2, 2]
    seconds = [2 * 3e-3 + 3e-3 * base.embedding / base.block, 6e-3, 6e-3, 6e-3 + 30e-3]
    fitted = fit_part_costs(base, counts, seconds)
    assert (fitted.block, fitted.head) == (3_000_000, 30_000_000)
    where = placement(pipeline_layout("1f1b", 4, 1, 8))
    refined = best_split(fitted, 8, where)
    assert max(rank_times(fitted, refined, where)) == 30_000_000  # the head alone is the slowest
