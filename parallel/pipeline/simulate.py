"""Replay a schedule's action order at fixed costs, to see the bubble it leaves.

The literature's formulas (parallel/pipeline/registry.py) describe each schedule as its paper draws it;
an implementation may order the same actions differently. This replays the order a schedule
runs (tridist's own, or the one torch lists for every rank: its schedule visualizer builds it
from mock stages, no process group) with parallel/pipeline/costs.py, by default with free
communication and per chunk F = I = W (B = I + W), and reports the idle share of the step.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # private API

from parallel.pipeline.costs import StageCosts, busiest_rank_work, replay, stage_to_rank
from parallel.pipeline.registry import PipelineLayout


def schedule_ops(layout: PipelineLayout, costs: StageCosts | None = None) -> list[list[list[Any]]]:
    """Per rank, the compute steps of the layout's order: tridist's own (searched ones at
    `costs`) or torch's."""
    spec, pp, microbatches, v = layout.spec, layout.pp, layout.microbatches, layout.stages_per_rank
    if spec.order is not None:
        order = spec.order(pp, pp * v, microbatches, costs)
        return [[[a] for a in order[r]] for r in range(pp)]
    assert spec.torch_class is not None  # a spec has one or the other
    return [
        [
            list(a.sub_actions or [a])
            for a in rank  # an OVERLAP_F_B runs its two actions in turn
            if a is not None and (a.sub_actions or a.computation_type.value in "FIWB")
        ]
        for rank in get_schedule_ops(spec.torch_class, pp, microbatches, v)
    ]


def simulated_bubble(layout: PipelineLayout, costs: StageCosts | None = None) -> float:
    """The bubble of the schedule's action order at `costs` (default: equal), as a fraction of
    the step: 1 - the busiest rank's compute / the step.

    gpipe and 1f1b at equal costs return their formula, which is exact for them (torch's action
    listing of single-stage schedules is not the order their runtime executes).
    """
    p, m, v = layout.pp, layout.microbatches, layout.stages_per_rank
    if layout.spec.order is None and v == 1:
        if costs is not None:
            raise ValueError(
                f"{layout.spec.name}: torch lists no order its runtime runs; give no costs"
            )
        return layout.bubble_fraction
    costs = costs or StageCosts.uniform(p * v, p)
    to_rank = stage_to_rank(p, p * v, layout.v_shape)
    finish = max(replay(schedule_ops(layout, costs), p * v, costs, to_rank))
    return 1 - busiest_rank_work(costs, to_rank, m) / finish
