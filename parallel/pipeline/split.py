"""The pipeline split from the cost model: how many blocks each stage holds so that the slowest
pipeline rank is as fast as it can be (`parallel.layers_per_stage=auto`), found exactly.

Costs are training FLOPs per token (forward + a backward of twice it, flops.py's rule) of each
part of the model, read from its real shapes on the meta device: a block (its matmuls and
attention), the embedding (a lookup; its backward adds one row per token), and the final norm,
output head and loss. A rank's time is the sum of its stages' (looped and V placements give a
rank several), since the slowest rank sets the step (estimate.py stretches it by the bubble).

Every block of the model has the same shapes, so a rank's cost depends only on how many blocks
it holds in all; and any per-stage counts are a contiguous split (stage s takes the next n_s
blocks). The search is therefore a min-max over ranks of "rank r holds N_r blocks" (a dynamic
program over ranks and blocks used, O(pp * n_layers^2)), run three times for the lexicographic
objective: slowest rank, then slowest stage (a chunk on the critical path of interleaved
schedules), then the largest activation memory (microbatches in flight x what the rank's
blocks and head keep), so that among equally fast splits the fuller first ranks of 1F1B get
fewer blocks. Within a rank, blocks go one at a time to its cheapest stage. Stages between the
two ends hold at least one block; an end stage may hold none (just the embedding, or just the
norm and head). tests/parallel/pipeline/test_split.py checks optimality against brute force.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from parallel.pipeline.registry import PipelineLayout
from parallel.pipeline.runtime import layers_per_stage


@dataclass(frozen=True)
class PartCosts:
    """Training FLOPs per token of each part of the model, and the activations it keeps (the
    cost model computes them: parallel/plan/parts.py)."""

    block: int
    embedding: int
    head: int  # final norm, output matmul and the loss
    block_activation: float  # bytes per token one block keeps for backward
    head_activation: float  # bytes per token the norm, head and loss keep (last stage)


@dataclass(frozen=True)
class Placement:
    """Where the stages sit: which stages each pipeline rank holds, and its microbatches held."""

    stages: tuple[tuple[int, ...], ...]  # per pipeline rank, its stage ids
    in_flight: tuple[float, ...]  # per pipeline rank, microbatches whose activations it keeps

    @property
    def n_stages(self) -> int:
        """Stages in all."""
        return sum(len(s) for s in self.stages)


def placement(layout: PipelineLayout) -> Placement:
    """Where the layout's schedule puts its stages (parallel/pipeline/registry.py)."""
    ranks = range(layout.pp)
    return Placement(
        tuple(tuple(layout.stage_ids(r)) for r in ranks), tuple(layout.in_flight(r) for r in ranks)
    )


def stage_cost(costs: PartCosts, stage: int, blocks: int, n_stages: int) -> int:
    """Estimated FLOPs per token of stage `stage` (of `n_stages`) holding `blocks` blocks."""
    ends = costs.embedding * (stage == 0) + costs.head * (stage == n_stages - 1)
    return blocks * costs.block + ends


def stage_times(costs: PartCosts, counts: Sequence[int]) -> list[int]:
    """Estimated FLOPs per token of each stage of the split `counts`."""
    return [stage_cost(costs, s, n, len(counts)) for s, n in enumerate(counts)]


def rank_times(costs: PartCosts, counts: Sequence[int], where: Placement) -> list[int]:
    """Estimated FLOPs per token of each pipeline rank: the sum of its stages'."""
    per_stage = stage_times(costs, counts)
    return [sum(per_stage[s] for s in sids) for sids in where.stages]


def _rank_memory(costs: PartCosts, blocks: int, holds_head: bool, held: float) -> float:
    return held * (blocks * costs.block_activation + costs.head_activation * holds_head)


def objective(costs: PartCosts, counts: Sequence[int], where: Placement) -> tuple[int, int, float]:
    """What the search minimizes, in order: slowest rank, slowest stage, largest activations."""
    last = len(counts) - 1
    memory = [
        _rank_memory(costs, sum(counts[s] for s in sids), last in sids, held)
        for sids, held in zip(where.stages, where.in_flight)
    ]
    return max(rank_times(costs, counts, where)), max(stage_times(costs, counts)), max(memory)


def _min_stage_blocks(stage: int, n_stages: int) -> int:
    return 0 if stage in (0, n_stages - 1) else 1


def _fill_rank(
    costs: PartCosts, sids: tuple[int, ...], n_stages: int, blocks: int
) -> list[int] | None:
    """Spread `blocks` over one rank's stages, each block to the stage cheapest so far (which
    minimizes the rank's slowest stage); None when fewer than its middle stages need."""
    counts = [_min_stage_blocks(s, n_stages) for s in sids]
    if blocks < sum(counts):
        return None
    for _ in range(blocks - sum(counts)):
        i = min(range(len(sids)), key=lambda k: stage_cost(costs, sids[k], counts[k], n_stages))
        counts[i] += 1
    return counts


def _min_max(values: list[list[float | None]], total: int) -> tuple[float, list[int]] | None:
    """Choose one n per rank (values[r][n] not None), summing to `total`, to minimize the
    largest values[r][n]; that value and the choice, or None when no choice sums to `total`."""
    inf = float("inf")
    best = [0.0] + [inf] * total  # over the ranks so far, by blocks used
    choices: list[list[int]] = []
    for row in values:
        nxt, pick = [inf] * (total + 1), [-1] * (total + 1)
        for used, so_far in enumerate(best):
            if so_far == inf:
                continue
            for n, value in enumerate(row[: total - used + 1]):
                if value is not None and max(so_far, value) < nxt[used + n]:
                    nxt[used + n], pick[used + n] = max(so_far, value), n
        best = nxt
        choices.append(pick)
    if best[total] == inf:
        return None
    blocks, used = [], total
    for pick in reversed(choices):
        blocks.append(pick[used])
        used -= pick[used]
    return best[total], blocks[::-1]


def best_split(costs: PartCosts, n_layers: int, where: Placement) -> list[int]:
    """The per-stage block counts minimizing `objective` lexicographically, exactly."""
    n_stages = where.n_stages
    if n_stages - 2 > n_layers:
        raise ValueError(
            f"{n_stages} pipeline stages need at least {n_stages - 2} blocks (one per stage "
            f"between the ends), the model has {n_layers}; use fewer stages (pp*virtual_stages)"
        )
    fills = [
        [_fill_rank(costs, sids, n_stages, n) for n in range(n_layers + 1)] for sids in where.stages
    ]
    # per rank and block count: (rank time, its slowest stage, its activations), or None
    scores = [
        [
            None
            if fill is None
            else (
                sum(stage_cost(costs, s, k, n_stages) for s, k in zip(sids, fill)),
                max(stage_cost(costs, s, k, n_stages) for s, k in zip(sids, fill)),
                _rank_memory(costs, n, n_stages - 1 in sids, held),
            )
            for n, fill in enumerate(rank)
        ]
        for rank, sids, held in zip(fills, where.stages, where.in_flight)
    ]
    choice: list[int] = []
    for level in range(3):  # each level keeps only what reaches the levels before's optimum
        values: list[list[float | None]] = [
            [None if score is None else score[level] for score in rank] for rank in scores
        ]
        found = _min_max(values, n_layers)
        assert found is not None  # every rank's minimum fits: checked above
        bound, choice = found
        scores = [
            [score if score is not None and score[level] <= bound else None for score in rank]
            for rank in scores
        ]
    counts = [0] * n_stages
    for sids, rank, n in zip(where.stages, fills, choice):
        for s, k in zip(sids, rank[n] or []):
            counts[s] = k
    return counts


@functools.lru_cache(maxsize=1024)
def _best_split_cached(costs: PartCosts, n_layers: int, where: Placement) -> tuple[int, ...]:
    return tuple(best_split(costs, n_layers, where))  # a layout search asks again


# null picks the auto split over the even one only when it is estimated this much faster
AUTO_DEFAULT_MIN_GAIN = 0.01


@dataclass(frozen=True)
class SplitChoice:
    """The split a run uses, how it was chosen, and the even split it was compared with."""

    counts: list[int]
    how: str  # explicit | even | auto | auto (default)
    even: list[int] | None  # the even split (embedding and head as a layer each), if any
    stage_flops: list[int]  # estimated training FLOPs per token of each stage
    rank_flops: list[int]  # ... and of each pipeline rank (its stages together)
    even_rank_flops: list[int] | None

    @property
    def automatic(self) -> bool:
        """True when the cost model chose the split."""
        return self.how.startswith("auto")

    @property
    def imbalance(self) -> float:
        """Slowest pipeline rank's estimated time over the mean rank's."""
        return imbalance(self.rank_flops)

    @property
    def even_slowdown(self) -> float | None:
        """How much slower the even split's slowest rank is estimated to be than this split's."""
        if self.even_rank_flops is None:
            return None
        return max(self.even_rank_flops) / max(self.rank_flops)


def imbalance(times: Sequence[float]) -> float:
    """max / mean of per-rank (or per-stage) times: 1.0 is perfectly balanced."""
    return max(times) * len(times) / sum(times)


def choose_split(
    costs: PartCosts,
    n_layers: int,
    layout: PipelineLayout,
    requested: str | Sequence[int] | None,
) -> SplitChoice:
    """The split of parallel.layers_per_stage=`requested`: an explicit list as given; `even`;
    `auto`; or None: the even split unless the auto one is estimated faster by more than
    AUTO_DEFAULT_MIN_GAIN (or no even split exists). ValueError when it cannot split."""
    where = placement(layout)

    def chosen(counts: list[int], how: str, even: list[int] | None) -> SplitChoice:
        even_ranks = None if even is None else rank_times(costs, even, where)
        return SplitChoice(
            counts,
            how,
            even,
            stage_times(costs, counts),
            rank_times(costs, counts, where),
            even_ranks,
        )

    if requested is not None and not isinstance(requested, str):
        explicit = layers_per_stage(n_layers, where.n_stages, list(requested))
        return chosen(explicit, "explicit", None)
    if requested == "even":
        return chosen(layers_per_stage(n_layers, where.n_stages), "even", None)
    try:
        even: list[int] | None = layers_per_stage(n_layers, where.n_stages)
    except ValueError:
        even = None
    auto = list(_best_split_cached(costs, n_layers, where))
    if requested == "auto":
        return chosen(auto, "auto", even)
    if even is not None:
        slow_even = max(rank_times(costs, even, where))
        if slow_even <= max(rank_times(costs, auto, where)) * (1 + AUTO_DEFAULT_MIN_GAIN):
            return chosen(even, "even", even)
    return chosen(auto, "auto (default)", even)


def fit_part_costs(
    base: PartCosts, counts: Sequence[int], stage_seconds: Sequence[float]
) -> PartCosts:
    """Costs refitted to measured compute time per stage of the split `counts` (e.g. one
    recorded step: parallel/pipeline/timeline.py), in nanoseconds: a block's and the head's by least
    squares on time = blocks * block + head on the last stage, the embedding scaled from `base`
    by the block's measured/estimated ratio. Activations stay `base`'s."""
    last = len(counts) - 1
    ratio = base.embedding / base.block
    a = torch.tensor([[n + ratio * (s == 0), float(s == last)] for s, n in enumerate(counts)])
    t = torch.tensor([[x * 1e9] for x in stage_seconds])
    block, head = (
        max(1, round(v)) for v in torch.linalg.lstsq(a.double(), t.double()).solution[:, 0].tolist()
    )
    return replace(base, block=block, embedding=round(block * ratio), head=head)
