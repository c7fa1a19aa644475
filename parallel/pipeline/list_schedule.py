"""The zero-bubble papers' greedy list scheduler (Qi et al., "Zero Bubble Pipeline Parallelism",
ICLR 2024, its ZB-2p heuristic and its ZB-V one), for one stage per rank or for the V (stages r
and 2p-1-r on rank r), as per-rank lists of torch _Actions (F, I = input gradient, W = weight
gradient) for torch's `_PipelineScheduleRuntime`.

It plays the step forward in time and, whenever a rank is free, starts an I whose gradient has
arrived, else an F whose input has arrived while the rank has room, else its oldest pending W
(filling what would be a bubble), else waits for whichever comes first. On a rank with two
stages it takes the later stage's I or F first, as the ZB-V heuristic does: the V's second leg
carries what the other ranks wait for. A chunk-microbatch counts against a rank's memory from
its F to its W (torch frees the last of its saved tensors there).

Written by hand: torch 2.13 lists fixed orders only and searches none from costs.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    _Action,
    _ComputationType,
)

from parallel.pipeline.costs import Done, StageCosts, replay, stage_to_rank

KINDS: dict[str, _ComputationType] = {"F": FORWARD, "I": BACKWARD_INPUT, "W": BACKWARD_WEIGHT}
Order = dict[int, list[_Action]]  # pipeline rank -> its compute actions, in order
# when nothing else can start, a pending W runs: "idle" always, "fits" only if it ends before
# the next F or I could start (else the rank waits for that one)
Fill = Literal["idle", "fits"]
First = Literal["I", "F"]  # which of an I and an F that can both start runs first
VARIANTS: tuple[tuple[First, Fill], ...] = (
    ("I", "idle"),
    ("I", "fits"),
    ("F", "idle"),
    ("F", "fits"),
)
Candidate = tuple[float, int, int, str]  # (start, kind's priority, later stage first, kind)


def list_schedule(
    pp: int,
    microbatches: int,
    costs: StageCosts,
    limit: int,
    v_shape: bool = False,
    fill: Fill = "idle",
    first: First = "I",
) -> Order:
    """The greedy list schedule at `costs` (one cost per stage: pp stages, or 2pp for the V),
    each rank holding at most `limit` chunk-microbatches between a forward and its W; of an I
    and an F that can both start, `first` runs first."""
    m, n = microbatches, len(costs.forward)
    to_rank = stage_to_rank(pp, n, v_shape)
    local = {r: sorted((s for s, q in to_rank.items() if q == r), reverse=True) for r in range(pp)}
    nxt = {(k, s): 0 for k in KINDS for s in range(n)}  # next microbatch per kind and stage
    done: dict[Done, float] = {}  # ("F" | "B" | "W", stage, microbatch) -> finish time
    clock, order = [0.0] * pp, {r: list[_Action]() for r in range(pp)}
    pending_w = {r: deque[tuple[int, int]]() for r in range(pp)}  # (stage, mb) after their I
    rank = {first: 0, "F" if first == "I" else "I": 1}  # priority of a kind, lower first

    def arrival(d: Done, r: int) -> float | None:
        return None if d not in done else done[d] + costs.p2p * (to_rank[d[1]] != r)

    def candidates(r: int) -> list[Candidate]:
        """Rank r's I and F that can run, each at the earliest time it could start."""
        now, held, timed = clock[r], sum(nxt["F", s] - nxt["W", s] for s in local[r]), []
        for s in local[r]:
            # a first-leg F leaves room for the second leg's next F, which the rank needs
            # before any gradient can come back (else the V's warm-up fills up and deadlocks)
            room = limit - (s != local[r][0] and nxt["F", local[r][0]] < m)
            mb_i, mb_f = nxt["I", s], nxt["F", s]
            if mb_i < mb_f:  # its forward ran; the gradient from the next stage may have arrived
                t = 0.0 if s == n - 1 else arrival(("B", s + 1, mb_i), r)
                timed += (
                    [] if t is None else [(max(t, now, done["F", s, mb_i]), rank["I"], -s, "I")]
                )
            if mb_f < m and held < room:
                t = 0.0 if s == 0 else arrival(("F", s - 1, mb_f), r)
                timed += [] if t is None else [(max(t, now), rank["F"], -s, "F")]
        return timed

    def pick(r: int) -> tuple[float, str, int] | None:
        """(start, kind, stage) of rank r's next action, or None while it has none to wait for."""
        now, timed = clock[r], sorted(candidates(r))
        ready = [c for c in timed if c[0] <= now]
        if ready:
            _, _, s, kind = min(ready, key=lambda c: c[1:3])  # `first`, then the later stage
            return now, kind, -s
        if pending_w[r]:
            s = pending_w[r][0][0]
            if fill == "idle" or not timed or now + costs.cost("W", s) <= timed[0][0]:
                return now, "W", s
        return (timed[0][0], timed[0][3], -timed[0][2]) if timed else None

    while len(done) < 3 * n * m:
        choices = [(c[0], r, c[1], c[2]) for r in range(pp) if (c := pick(r)) is not None]
        if not choices:
            raise ValueError(f"no order fits a memory limit of {limit} microbatches")
        start, r, kind, s = min(choices, key=lambda c: c[:2])  # the earliest start, then rank
        mb = nxt[kind, s]
        clock[r] = start + costs.cost(kind, s)
        done["B" if kind == "I" else kind, s, mb] = clock[r]
        nxt[kind, s] += 1
        if kind == "I":
            pending_w[r].append((s, mb))
        elif kind == "W":
            pending_w[r].popleft()
        order[r].append(_Action(s, KINDS[kind], mb))
    return order


def step_time(order: Order, costs: StageCosts) -> float:
    """The order's step time at `costs` (stages sit where the order runs them), replayed."""
    to_rank = {a.stage_index: r for r, actions in order.items() for a in actions}
    ops = [[[a] for a in order[r]] for r in range(len(order))]
    return max(replay(ops, len(costs.forward), costs, to_rank))


def peak_in_flight(order: Order) -> dict[int, int]:
    """Per rank, the most chunk-microbatches held between a forward and its weight gradient."""
    peaks = {}
    for r, actions in order.items():
        held = peak = 0
        for a in actions:
            held += {"F": 1, "W": -1}.get(a.computation_type.value, 0)
            peak = max(peak, held)
        peaks[r] = peak
    return peaks
