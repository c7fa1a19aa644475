"""tridist-made zero-bubble action orders, one stage per rank (Qi et al., "Zero Bubble Pipeline
Parallelism", ICLR 2024): the handcrafted ZB-H1 and ZB-H2 and the searched ZB-1p and ZB-2p, as
per-rank lists of torch _Actions (F, I = input gradient, W = weight gradient) that torch's
`_PipelineScheduleRuntime` runs, adding the sends and receives (parallel/pipeline.py).

Written by hand: torch 2.13 has no one-stage-per-rank zero-bubble order and searches none from
costs. A microbatch counts against a rank's memory from its F to its W (torch frees the last of
its saved tensors there).
- zb_h1: the paper's pattern: rank r runs 1F1B's p-1-r warm-up forwards, then F, I and, r
  microbatches late, W: every rank holds p microbatches, 1F1B's first-stage peak.
- zb_h2: 2p-1 in flight, ordered by the list scheduler below at the paper's costs F = I = W.
- zb_1p / zb_2p: searched at the run's costs under p / 2p: every ZB-H1-shaped order (more
  warm-up forwards, later weight gradients) and the list scheduler at every memory limit are
  replayed (parallel/plan/replay.py) and the shortest wins, so they never lose to zb_h1 / zb_h2.
The list scheduler is the paper's heuristic: it plays the step forward in time and, whenever a
rank is free, starts an I whose gradient has arrived, else an F while the rank has room, else
its oldest pending W (filling what would be a bubble), else waits.

Under torch's runtime every step ends on every rank before the optimizer runs, so the last rank
idles (p-1) F before its first input arrives, whatever the order: (p-1) F of bubble per rank is
the floor, which ZB-H1 already reaches at F = I = W. The papers' zero bubble for ZB-H2 (and
ZB-V) also needs their optimizer post-validation, which lets one step's warm-up fill the previous
step's cool-down; torch's step() does not overlap steps.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    _Action,
    _ComputationType,
)

from parallel.plan.replay import Done, StageCosts, replay, stage_to_rank

KINDS: dict[str, _ComputationType] = {"F": FORWARD, "I": BACKWARD_INPUT, "W": BACKWARD_WEIGHT}
Order = dict[int, list[_Action]]  # pipeline rank -> its compute actions, in order


def h1_shaped(pp: int, microbatches: int, extra_warmup: int = 0, extra_lag: int = 0) -> Order:
    """ZB-H1's pattern: on rank r, p-1-r (+ extra) warm-up forwards, then F, I and the W of
    r (+ extra) microbatches before, the remaining W's last."""
    m, order = microbatches, {}
    for r in range(pp):
        warm = min(m, pp - 1 - r + extra_warmup)
        acts = [_Action(r, FORWARD, k) for k in range(warm)]
        n_f, n_w = warm, 0
        for k in range(m):
            if n_f < m:
                acts.append(_Action(r, FORWARD, n_f))
                n_f += 1
            acts.append(_Action(r, BACKWARD_INPUT, k))
            if k >= r + extra_lag:
                acts.append(_Action(r, BACKWARD_WEIGHT, n_w))
                n_w += 1
        order[r] = acts + [_Action(r, BACKWARD_WEIGHT, k) for k in range(n_w, m)]
    return order


def list_schedule(pp: int, microbatches: int, costs: StageCosts, limit: int) -> Order:
    """The paper's greedy list schedule at `costs`, each rank holding at most `limit`
    microbatches between a forward and its weight gradient (one stage per rank)."""
    m, n, to_rank = microbatches, pp, stage_to_rank(pp, pp, False)
    nxt = {(k, s): 0 for k in KINDS for s in range(n)}  # next microbatch per kind and stage
    done: dict[Done, float] = {}  # ("F" | "B" | "W", stage, microbatch) -> finish time
    clock, order = [0.0] * pp, {r: list[_Action]() for r in range(pp)}

    def arrival(d: Done, s: int) -> float | None:
        return None if d not in done else done[d] + costs.p2p * (to_rank[d[1]] != s)

    def pick(s: int) -> tuple[float, str] | None:
        """(start, kind) of stage s's next action: I, then F (with room), then W, else wait."""
        now, timed = clock[s], []
        mb_i, mb_f = nxt["I", s], nxt["F", s]
        if mb_i < mb_f:  # its forward ran; the gradient from the next stage may have arrived
            t = 0.0 if s == n - 1 else arrival(("B", s + 1, mb_i), s)
            timed += [] if t is None else [(max(t, now, done["F", s, mb_i]), "I")]
        if mb_f < m and mb_f - nxt["W", s] < limit:
            t = 0.0 if s == 0 else arrival(("F", s - 1, mb_f), s)
            timed += [] if t is None else [(max(t, now), "F")]
        if any(t <= now for t, _ in timed):
            return now, "I" if any(k == "I" and t <= now for t, k in timed) else "F"
        if nxt["W", s] < mb_i:  # nothing else can start now: fill with a weight gradient
            return now, "W"
        return min(timed, key=lambda c: (c[0], c[1] != "I")) if timed else None

    while len(done) < 3 * n * m:
        choices = [(c[0], s, c[1]) for s in range(n) if (c := pick(s)) is not None]
        if not choices:
            raise ValueError(f"no order fits a memory limit of {limit} microbatches")
        start, s, kind = min(choices, key=lambda c: c[:2])  # the earliest start, then stage
        mb = nxt[kind, s]
        clock[s] = start + costs.cost(kind, s)
        done["B" if kind == "I" else kind, s, mb] = clock[s]
        nxt[kind, s] += 1
        order[s].append(_Action(s, KINDS[kind], mb))
    return order


def step_time(order: Order, costs: StageCosts) -> float:
    """The order's step time at `costs` (one stage per rank), replayed."""
    ops = [[[a] for a in order[r]] for r in range(len(order))]
    return max(replay(ops, len(order), costs, stage_to_rank(len(order), len(order), False)))


def peak_in_flight(order: Order) -> dict[int, int]:
    """Per rank, the most microbatches held between a forward and its weight gradient."""
    peaks = {}
    for r, actions in order.items():
        held = peak = 0
        for a in actions:
            held += {"F": 1, "W": -1}.get(a.computation_type.value, 0)
            peak = max(peak, held)
        peaks[r] = peak
    return peaks


@lru_cache(maxsize=64)
def searched_order(pp: int, microbatches: int, costs: StageCosts, limit: int) -> Order:
    """ZB-1p / ZB-2p: the shortest order at `costs` holding at most `limit` microbatches
    (cached: callers copy it)."""
    # a ZB-H1-shaped order holds p + warm + lag microbatches
    candidates = [
        h1_shaped(pp, microbatches, warm, lag)
        for warm, lag in itertools.product(range(limit - pp + 1), repeat=2)
        if warm + lag <= limit - pp
    ]
    candidates += [list_schedule(pp, microbatches, costs, k) for k in range(1, limit + 1)]
    fits = [o for o in candidates if max(peak_in_flight(o).values()) <= limit]
    return min(fits, key=lambda o: step_time(o, costs))  # h1_shaped(0, 0) always fits p


@lru_cache(maxsize=64)
def _at_equal_costs(kind: str, pp: int, microbatches: int) -> Order:
    if kind == "h1":
        return h1_shaped(pp, microbatches)
    return list_schedule(pp, microbatches, StageCosts.uniform(pp, pp), 2 * pp - 1)


def _copy(order: Order) -> Order:
    return {r: list(actions) for r, actions in order.items()}


def zb_h1_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-H1 (costs are ignored: the order is fixed)."""
    return _copy(_at_equal_costs("h1", pp, microbatches))


def zb_h2_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-H2 (costs are ignored: the order is the one for F = I = W)."""
    return _copy(_at_equal_costs("h2", pp, microbatches))


def zb_1p_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-1p: searched at `costs` (equal when None) under 1F1B's peak, p microbatches."""
    return _copy(searched_order(pp, microbatches, costs or StageCosts.uniform(pp, pp), pp))


def zb_2p_order(pp: int, n_stages: int, microbatches: int, costs: StageCosts | None) -> Order:
    """ZB-2p: searched at `costs` (equal when None) under twice 1F1B's peak, 2p microbatches."""
    return _copy(searched_order(pp, microbatches, costs or StageCosts.uniform(pp, pp), 2 * pp))
