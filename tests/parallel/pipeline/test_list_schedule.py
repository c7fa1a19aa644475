"""The greedy list scheduler: one stage per rank as before, the V's warm-up without deadlock,
its memory limit kept, and the replay of an order wherever its stages sit."""

from __future__ import annotations

import itertools

import pytest

from parallel.pipeline.costs import StageCosts
from parallel.pipeline.list_schedule import VARIANTS, list_schedule, peak_in_flight, step_time


def test_list_schedule_refuses_a_limit_of_nothing() -> None:
    with pytest.raises(ValueError, match="memory limit of 0"):
        list_schedule(2, 4, StageCosts.uniform(2, 2), 0)


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 3)])
def test_the_v_runs_both_legs_on_each_rank_within_its_limit(p: int, m: int) -> None:
    costs = StageCosts.uniform(2 * p, p)
    for (first, fill), limit in itertools.product(VARIANTS, (p + 1, 2 * p)):
        order = list_schedule(p, m, costs, limit, True, fill, first)
        for r, actions in order.items():
            seen = sorted(
                (a.stage_index, a.computation_type.value, a.microbatch_index) for a in actions
            )
            assert seen == sorted(itertools.product((r, 2 * p - 1 - r), "FIW", range(m)))
        assert max(peak_in_flight(order).values()) <= limit
        # at least the busiest rank's work and the last rank's wait for its first input
        assert step_time(order, costs) >= 3 * m + (p - 1) / 2 - 1e-9


def test_the_v_at_the_papers_memory_reaches_the_floor() -> None:
    p, m = 4, 8
    costs = StageCosts.uniform(2 * p, p)
    order = list_schedule(p, m, costs, 2 * p, True, "fits", "F")
    assert step_time(order, costs) == pytest.approx(3 * m + (p - 1) / 2)
    # the later leg first: rank p-1 runs its two stages back to back in the warm-up
    assert [(a.stage_index, a.computation_type.value) for a in order[p - 1][:2]] == [
        (p - 1, "F"),
        (p, "F"),
    ]
