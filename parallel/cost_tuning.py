"""Search a zero-bubble order (zb_1p, zb_2p) from the run's own costs: time one step's pipeline
actions on every rank (parallel/timeline.py), take each stage's median forward, input-gradient
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

from parallel.pipeline import set_order
from parallel.plan.replay import StageCosts
from parallel.plan.simulate import simulated_bubble
from parallel.schedules import schedule_spec
from parallel.timeline import Event, record_step

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
    name: str,
    pp: int,
    n_stages: int,
    microbatches: int,
    device: torch.device,
) -> tuple[T, StageCosts, float]:
    """Run `step` with its actions timed, then search `name`'s order at the measured costs and
    run it from the next step on. Returns the step's result, the costs and the predicted bubble
    (fraction of the step). Collective over the world group: every rank calls it."""
    result, events = record_step(step, schedule, device)
    shared = [costs_from_events(events, n_stages) if events is not None else None]
    dist.broadcast_object_list(shared, src=0)  # every rank searches at the same costs
    costs = shared[0]
    assert costs is not None  # broadcast from rank 0, which gathered every rank's events
    set_order(schedule, schedule_spec(name).order(pp, n_stages, microbatches, costs))  # type: ignore[misc]
    return result, costs, simulated_bubble(name, pp, microbatches, 1, costs)
