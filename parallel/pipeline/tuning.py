"""Search a zero-bubble order (zb_1p, zb_2p) from the run's own costs: time one step's pipeline
actions on every rank (parallel/pipeline/timeline.py), take each stage's median forward, input-gradient
and weight-gradient times, and load the order searched at them into the running schedule.

p2p is taken as free: a measured wait mixes transfer time with the bubble itself. torch runs
stage 0's whole backward in its W action (stage 0 needs no input gradient), which the measured
costs reflect as they are.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from parallel.pipeline.costs import StageCosts
from parallel.pipeline.registry import PipelineLayout
from parallel.pipeline.runtime import set_order
from parallel.pipeline.simulate import simulated_bubble
from parallel.pipeline.timeline import Event, record_step

T = TypeVar("T")
SHORTEST_S = 1e-6  # an action measured at ~0 (stage 0's I) still needs a positive cost


def costs_from_events(events: list[Event], n_stages: int) -> StageCosts:
    """Per stage, the median time of its F, I and W actions (a full backward B counts half to
    I and half to W)."""
    times: dict[tuple[str, int], list[float]] = {}
    for e in events:
        halves = {"B": (("I", 0.5), ("W", 0.5))}.get(e.kind, ((e.kind, 1.0),))
        for kind, share in halves:
            times.setdefault((kind, e.stage), []).append(share * (e.end - e.start))

    def median(kind: str, s: int) -> float:
        return max(SHORTEST_S, statistics.median(times.get((kind, s), [0.0])))

    f, i, w = (tuple(median(k, s) for s in range(n_stages)) for k in "FIW")
    return StageCosts(f, i, w)


def tune_order(
    step: Callable[[], T],
    schedule: Any,
    layout: PipelineLayout,
    device: torch.device,
) -> tuple[T, StageCosts, float]:
    """Run `step` with its actions timed, then search the layout's order at the measured costs and
    run it from the next step on. Returns the step's result, the costs and the predicted bubble
    (fraction of the step). Collective over the world group: every rank calls it."""
    result, events = record_step(step, schedule, device)
    n_stages, pp, m = layout.n_stages, layout.pp, layout.microbatches
    shared = [costs_from_events(events, n_stages) if events is not None else None]
    dist.broadcast_object_list(shared, src=0)  # every rank searches at the same costs
    costs = shared[0]
    assert costs is not None  # broadcast from rank 0, which gathered every rank's events
    assert layout.spec.order is not None  # only searched orders are tuned
    set_order(schedule, layout.spec.order(pp, n_stages, m, costs))
    return result, costs, simulated_bubble(layout, costs)
